"""A study's results on disk: where things are, what state each trial is in, and the long-format
tables built from them. Reads files only — no Ray, no GPU — so ``study status`` and the analysis
work on a finished study, on an interrupted one and while a study is running.

Layout of ``results/NAME/``::

    study.yaml                resolved space, experiments, data summary, provenance, fingerprint
    tune/<stage>/             Ray Tune experiments ``stage1`` and ``stage2`` (Tuner.restore reads these)
    trials/<stage>/trial-NNNN-<id>/   one folder per trial (see study.trial); trial.json names its method
    stages/<stage>.json       a stage finished: its selected trial per method
    final/<stage>--<method>.json      test-set reports of the selected configuration, per seed
    trials.csv                one row per stage, method, trial and seed (schema: TRIALS_COLUMNS)
    per_class.csv             per-class accuracy and weight norm of every selected configuration
    optuna.db                 SQLite Optuna storage, one study per stage and method (``stage2-wb``)
    tables/, plots/           written when the study finishes
    done.json                 the study finished
    .lock                     held while a `study run` is working on the folder

Trial statuses: ``completed``; ``diverged`` (loss or weights became NaN/inf; never selected);
``failed`` (raised on every retry); ``stopped`` (ended early by the ASHA scheduler);
``running`` (in flight while a `study run` holds the lock); ``interrupted`` (was in flight when the
study stopped; continues from its last epoch checkpoint on resume); ``pending`` (not started).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .errors import UserError
from .fsutil import StudyLock, atomic_write_bytes, read_json, read_json_or_none, read_jsonl


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


FAILURE_STATUSES = ("diverged", "failed")
"""Trial statuses that count as failures (a NaN/inf loss; an exception after its retries)."""

TRIAL_DIR_RE = re.compile(r"^trial-(\d+)-([0-9a-f]+(?:_\d+)?)$")

TRIALS_COLUMNS = [
    "study", "stage", "experiment", "method", "trial", "trial_id", "seed", "status", "reason", "selected",
    "objective", "best_epoch", "epochs_run", "resumed_from_epoch", "selection_split",
    "sel_all", "sel_many", "sel_medium", "sel_few", "test_all", "test_many", "test_medium", "test_few",
    "norm_ratio", "norm_cv", "norm_spearman", "maxnorm_radius", "tau", "notes",
]
"""trials.csv columns, followed by one ``param.<name>`` column per searched parameter. Accuracies are
fractions in 0-1 (``sel_*`` on the selection split — validation under the honest protocol, test
under wb-parity — at the seed's selected epoch; ``test_*`` only for selected configurations)."""

PER_CLASS_COLUMNS = ["study", "stage", "experiment", "method", "seed", "class", "train_count", "group",
                     "sel_acc", "test_acc", "weight_norm"]


def trial_index_of(experiment_tag: str | None, trial_id: str) -> int:
    """0-based index of a trial in its experiment: Tune's experiment tag starts with the 1-based
    counter ("3_weight_decay=..."); grid trial ids end with it ("ab12c_00002")."""
    head = str(experiment_tag or "").split("_", 1)[0]
    if head.isdigit():
        return int(head) - 1
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if "_" in trial_id and tail.isdigit() else 0


def check_name(name: str) -> str:
    """Study names are one folder below the results folder: no paths, no '..'."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("~") \
            or os.path.isabs(name) or ".." in Path(name).parts:
        raise UserError(f"--name {name!r}: a study name must be a plain folder name (no '/', '..' or "
                        "absolute paths); use --results-dir to choose where results go")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_', '+' and '-' only")
    return name


class StudyPaths:
    """Where everything of a study lives (all absolute)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.tune = self.root / "tune"
        self.trials = self.root / "trials"
        self.stages = self.root / "stages"
        self.final = self.root / "final"
        self.study_yaml = self.root / "study.yaml"
        self.done = self.root / "done.json"
        self.trials_csv = self.root / "trials.csv"
        self.per_class_csv = self.root / "per_class.csv"
        self.optuna_db = self.root / "optuna.db"
        self.tables = self.root / "tables"
        self.plots = self.root / "plots"

    def trial_dir(self, experiment: str, index: int, trial_id: str) -> Path:
        return self.trials / experiment / f"trial-{index:04d}-{trial_id}"

    def stage_marker(self, experiment: str) -> Path:
        return self.stages / f"{experiment}.json"

    def final_file(self, experiment: str, method: str) -> Path:
        return self.final / f"{experiment}--{method}.json"


def read_yaml_file(path: str | os.PathLike) -> Any:
    import yaml

    with open(path, "r", encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_header(root: str | os.PathLike) -> tuple[StudyPaths, dict]:
    """The study's paths and study.yaml; a clear error when ``root`` is not a study folder."""
    paths = StudyPaths(root)
    if not paths.root.is_dir():
        raise UserError(f"{root}: no such study folder (studies live in results/NAME)")
    if not paths.study_yaml.is_file():
        raise UserError(f"{root} is not a study folder (no study.yaml); pass a folder written by 'study run'")
    try:
        header = read_yaml_file(paths.study_yaml)
    except Exception as e:
        raise UserError(f"{paths.study_yaml} is unreadable ({type(e).__name__}); the study folder is damaged") from None
    if not isinstance(header, dict) or "experiments" not in header:
        raise UserError(f"{paths.study_yaml} is not a study header; the study folder is damaged")
    return paths, header


# --- Tune's own view (for statuses our files cannot know: pending, early-stopped, errored) --------------

def tune_trials(paths: StudyPaths, experiment: str) -> dict[str, dict]:
    """trial_id -> {status, index, logdir} from the newest experiment_state-*.json (empty if none)."""
    files = sorted(glob.glob(str(paths.tune / experiment / "experiment_state-*.json")))
    for f in reversed(files):
        try:
            state = read_json(f)
        except (OSError, ValueError):
            continue
        out = {}
        for entry in state.get("trial_data", []):
            tj = entry[0]
            if isinstance(tj, str):
                tj = json.loads(tj)
            out[tj["trial_id"]] = {"status": tj.get("status"),
                                   "index": trial_index_of(tj.get("experiment_tag"), tj["trial_id"]),
                                   "logdir": tj.get("relative_logdir"), "config": tj.get("config", {})}
        return out
    return {}


def error_reason(error_file: str | os.PathLike | None) -> str:
    """A failed trial's reason: the last line of Tune's ``error.txt`` (the exception), at most 500
    characters; ``trial raised`` when there is none."""
    try:
        lines = [ln for ln in Path(error_file).read_text(errors="replace").splitlines() if ln.strip()]
    except (OSError, TypeError):
        return "trial raised"
    return lines[-1][-500:] if lines else "trial raised"


def _tune_error(paths: StudyPaths, experiment: str, logdir: str | None) -> str:
    return error_reason(paths.tune / experiment / logdir / "error.txt" if logdir else None)


def lock_alive(paths: StudyPaths) -> bool:
    lock = StudyLock(paths.root)
    info = lock.owner()
    return info is not None and not lock.is_stale(info)


def experiment_trials(paths: StudyPaths, experiment: str, live: bool | None = None,
                      include_unknown: bool | None = None) -> list[dict]:
    """Every known trial of an experiment with its status, params, objective and per-seed records.

    ``live``: a `study run` holds the study (in-flight trials are ``running``, not ``interrupted``).
    ``include_unknown``: also list trial folders that Tune's last snapshot does not know — trials
    of a live run that have not reached their first report yet; after a hard kill such folders are
    never resumed (see ``search.set_aside_orphans``). Default: ``live``."""
    if live is None:
        live = lock_alive(paths)
    if include_unknown is None:
        include_unknown = live
    tune_state = tune_trials(paths, experiment)
    out: dict[str, dict] = {}
    folder = paths.trials / experiment
    if folder.is_dir():
        for tdir in sorted(folder.iterdir()):
            m = TRIAL_DIR_RE.match(tdir.name)
            if not m or not tdir.is_dir():
                continue
            if tune_state and not include_unknown and m.group(2) not in tune_state:
                continue
            t: dict[str, Any] = {"trial_index": int(m.group(1)), "trial_id": m.group(2), "dir": tdir,
                                 "method": None, "params": {}, "record": None, "reason": None}
            info = read_json_or_none(tdir / "trial.json")
            if info:
                t["method"] = info.get("method")
                t["params"] = info.get("params", {})
            record = read_json_or_none(tdir / "record.json")
            failed = read_json_or_none(tdir / "failed.json")
            events = read_jsonl(tdir / "events.jsonl")
            epochs = [e for e in events if e.get("event") == "epoch"]
            t["events"] = epochs
            t["resumed_from_epoch"] = max((e.get("start_epoch", 0) for e in events if e.get("event") == "start"),
                                          default=0)
            t["notes"] = "; ".join(e.get("note", "") for e in events if e.get("event") == "fallback")
            t["objective"] = epochs[-1].get("objective") if epochs else None
            t["epochs_run"] = epochs[-1].get("epoch") if epochs else 0
            tstat = (tune_state.get(t["trial_id"]) or {}).get("status")
            if record:
                t["record"] = record
                t["status"] = record["status"]
                t["reason"] = record.get("reason")
                t["objective"] = record.get("objective")
                t["epochs_run"] = record.get("epochs_run", t["epochs_run"])
                t["params"] = record.get("params", t["params"])
            elif failed:
                t["status"], t["reason"] = "failed", failed.get("reason")
            elif tstat == "ERROR":
                t["status"] = "failed"
                t["reason"] = _tune_error(paths, experiment, tune_state[t["trial_id"]].get("logdir"))
            elif tstat == "TERMINATED":
                t["status"] = "stopped"
                t["reason"] = "stopped early by the ASHA scheduler"
            else:
                t["status"] = "running" if live else "interrupted"
            out[t["trial_id"]] = t
    for tid, ts in tune_state.items():  # suggested by the searcher but never started
        if tid not in out and ts.get("status") in ("PENDING", "PAUSED", "RUNNING"):
            cfg = {k: v for k, v in (ts.get("config") or {}).items() if k not in ("_study",)}
            out[tid] = {"trial_index": ts.get("index") or 0, "trial_id": tid, "dir": None,
                        "method": cfg.pop("method", None), "params": cfg, "record": None,
                        "status": "pending", "reason": None, "objective": None, "epochs_run": 0,
                        "resumed_from_epoch": 0, "events": [], "notes": ""}
    return sorted(out.values(), key=lambda t: t["trial_index"])


# --- trials.csv and per_class.csv -------------------------------------------------------------------------

def collect(paths: StudyPaths, header: dict) -> tuple[list[dict], list[dict]]:
    """(trials rows, per-class rows) from the files of a study."""
    from .data import shot_groups

    study = header.get("study", paths.root.name)
    seeds = header["space"]["seeds"]
    counts = header["data"]["train_counts"]
    groups = shot_groups(counts, header["data"]["many_threshold"], header["data"]["few_threshold"])
    split = header["data"]["selection_split"]
    live = lock_alive(paths)
    rows: list[dict] = []
    per_class: list[dict] = []
    for exp in header["experiments"]:
        name = exp["name"]
        marker = read_json_or_none(paths.stage_marker(name))
        selected = (marker or {}).get("selected", {})
        for t in experiment_trials(paths, name, live, include_unknown=False):
            method = t["method"]
            if method is None:  # a trial folder whose trial.json was never written: nothing to report
                continue
            sel = selected.get(method) or {}
            is_sel = sel.get("trial_id") == t["trial_id"]
            final = read_json_or_none(paths.final_file(name, method)) if is_sel else None
            rec = t["record"] or {}
            for seed in seeds:
                ps = (rec.get("per_seed") or {}).get(str(seed)) or {}
                sel_rep = ps.get("selection") or {}
                test = ((final or {}).get("per_seed") or {}).get(str(seed)) or {}
                bal = ps.get("balance") or {}
                row = {"study": study, "stage": exp["stage"], "experiment": name, "method": method,
                       "trial": t["trial_index"], "trial_id": t["trial_id"], "seed": seed, "status": t["status"],
                       "reason": t["reason"], "selected": is_sel, "objective": t["objective"],
                       "best_epoch": ps.get("best_epoch"), "epochs_run": t["epochs_run"],
                       "resumed_from_epoch": t["resumed_from_epoch"], "selection_split": split,
                       **{f"sel_{g}": sel_rep.get(g) for g in ("all", "many", "medium", "few")},
                       **{f"test_{g}": test.get(g) for g in ("all", "many", "medium", "few")},
                       "norm_ratio": bal.get("norm_ratio"), "norm_cv": bal.get("norm_cv"),
                       "norm_spearman": bal.get("norm_spearman"), "maxnorm_radius": ps.get("maxnorm_radius"),
                       "tau": ps.get("tau"), "notes": t.get("notes") or None}
                for k, v in (t["params"] or {}).items():
                    row[f"param.{k}"] = v
                rows.append(row)
                if is_sel and ps:
                    norms = ps.get("weight_norms") or []
                    sel_pc = sel_rep.get("per_class") or []
                    test_pc = test.get("per_class") or []
                    for c, n in enumerate(counts):
                        per_class.append({"study": study, "stage": exp["stage"], "experiment": name,
                                          "method": method, "seed": seed, "class": c, "train_count": n,
                                          "group": str(groups[c]),
                                          "sel_acc": sel_pc[c] if c < len(sel_pc) else None,
                                          "test_acc": test_pc[c] if c < len(test_pc) else None,
                                          "weight_norm": norms[c] if c < len(norms) else None})
    return rows, per_class


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    import csv
    import io

    extra = sorted({k for r in rows for k in r if k not in columns})
    cols = columns + extra
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in cols})
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


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
    _write_csv(paths.trials_csv, rows, TRIALS_COLUMNS)
    _write_csv(paths.per_class_csv, per_class, PER_CLASS_COLUMNS)
    return len(rows), len(per_class)


# --- optuna.db ------------------------------------------------------------------------------------------

def _distributions(header: dict, exp: dict, method: str) -> dict:
    from .spaces import dist_from_yaml

    space = header["space"]
    if exp["stage"] == "stage1":
        search = space["stage1"]["search"] if method == "tuned" else {}
    else:
        search = space["stage2"][method]["search"]
    return {k: dist_from_yaml(v).to_optuna() for k, v in (search or {}).items()}


def export_optuna(paths: StudyPaths) -> Path:
    """Rebuild ``optuna.db``: one Optuna study per stage and method (``stage1-naive``,
    ``stage1-tuned``, ``stage2-wb``, ...), its trials with their parameters, objective, per-epoch
    intermediate values and user attributes ``tune_trial_id``, ``status``, ``reason``. Built in a
    temporary file and renamed, so readers never see a half-written database."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _, header = load_header(paths.root)
    tmp = paths.optuna_db.with_name(".optuna.db.tmp")
    tmp.unlink(missing_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}")
    live = lock_alive(paths)
    state_of = {"completed": TrialState.COMPLETE, "diverged": TrialState.FAIL, "failed": TrialState.FAIL,
                "stopped": TrialState.PRUNED}
    for exp in header["experiments"]:
        trials = experiment_trials(paths, exp["name"], live, include_unknown=False)
        for method in exp["methods"]:
            study_name = f"{exp['name']}-{method}"
            study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                        load_if_exists=True)
            dists = _distributions(header, exp, method)
            for t in trials:
                if t["method"] != method or t["status"] not in state_of:
                    continue
                state = state_of[t["status"]]
                params = {k: v for k, v in (t["params"] or {}).items() if k in dists}
                inter = {int(e["epoch"]): float(e["objective"]) for e in t.get("events", [])
                         if e.get("objective") is not None and math.isfinite(e["objective"])}
                attrs = {"tune_trial_id": t["trial_id"], "trial_index": t["trial_index"], "status": t["status"],
                         "reason": t["reason"] or ""}
                study.add_trial(create_trial(
                    params=params, distributions={k: dists[k] for k in params},
                    value=t["objective"] if state == TrialState.COMPLETE else None, state=state,
                    intermediate_values=inter, user_attrs=attrs))
    if hasattr(storage, "engine"):
        storage.engine.dispose()
    del storage
    os.replace(tmp, paths.optuna_db)
    return paths.optuna_db


# --- status summary -------------------------------------------------------------------------------------

def best_completed(trials: list[dict], method: str) -> dict | None:
    """The completed trial of ``method`` with the highest objective (ties: the earlier trial), from
    ``experiment_trials``. Diverged, failed and early-stopped trials never count."""
    best = None
    for t in trials:
        if t["method"] == method and t["status"] == "completed" and t["objective"] is not None \
                and (best is None or t["objective"] > best["objective"]):
            best = t
    return best


def study_status(root: str | os.PathLike) -> dict:
    """Per stage and method: completed / diverged / failed / running / pending against the budget,
    and the best configuration so far. Reads files only."""
    paths, header = load_header(root)
    live = lock_alive(paths)
    out = {"study": header.get("study"), "root": str(paths.root), "complete": paths.done.exists(),
           "running": live, "experiments": []}
    for exp in header["experiments"]:
        trials = experiment_trials(paths, exp["name"], live)
        methods = {}
        for method, info in exp["methods"].items():
            mine = [t for t in trials if t["method"] == method]
            counts = {s: 0 for s in ("completed", "diverged", "failed", "stopped", "running", "interrupted")}
            for t in mine:
                if t["status"] != "pending":
                    counts[t["status"]] = counts.get(t["status"], 0) + 1
            counts["pending"] = max(0, info["budget"] - sum(counts.values()))
            b = best_completed(mine, method)
            best = b and {"trial": b["trial_index"], "objective": b["objective"], "params": b["params"]}
            methods[method] = {"budget": info["budget"], "counts": counts, "best": best}
        total = {k: sum(m["counts"][k] for m in methods.values()) for k in next(iter(methods.values()))["counts"]}
        out["experiments"].append({"name": exp["name"], "budget": exp["budget"],
                                   "finished": paths.stage_marker(exp["name"]).exists(), "counts": total,
                                   "methods": methods})
    out["final_evaluations"] = sorted(p.stem for p in paths.final.glob("*.json")) if paths.final.is_dir() else []
    return out


def finish_study(paths: StudyPaths, view_log=print) -> None:
    """trials.csv, per_class.csv, optuna.db, tables and plots (all rebuilt from disk, idempotent)."""
    from .faults import pause_point

    write_records(paths)
    export_optuna(paths)
    pause_point("tables", view_log)
    from .analysis import load_results, write_all_tables
    from .plots import write_all_plots

    results = load_results(paths.root)  # read once for both
    write_all_tables(results)
    write_all_plots(results)
