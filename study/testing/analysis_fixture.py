"""A small synthetic study folder with hand-chosen values, for the analysis and plot tests.

Layout as written by ``study run``, through the same file views (``study.layout``): study.yaml,
trials.csv, per_class.csv, the trial folders (trial.json, record.json / failed.json), stages/*.json,
final/*.json, optionally optuna.db and done.json. Nothing of the real pipeline runs.

Known values (test accuracies as fractions, per seed 0, 1, 2):

=================  ====================  ====================  ====================  ====================
stage/method       all                   many                  medium                few
=================  ====================  ====================  ====================  ====================
stage1/naive       .500 .520 .510        .900 .910 .920        .500 .480 .520        .100 .140 .120
stage1/tuned       .560 .580 .570        .920 .930 .910        .560 .550 .570        .200 .220 .240
stage2/none        (as stage1/tuned)
stage2/tau-norm    .600 .610 .620        .880 .870 .890        .600 .610 .630        .300 .320 .340
stage2/wb          .640 .655 .650        .920 .925 .915        .640 .660 .650        .360 .380 .370
=================  ====================  ====================  ====================  ====================

Stage 1 has one diverged trial (tuned, trial 3), stage 2 one failed trial (wb, trial 4). wb has 4
completed trials (enough for parameter importances), stage1/tuned 3 (not enough).
``interrupted=True``: no done.json, wb's final test evaluation is missing and an ``lws`` method was
started but has no completed trial.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import stats

from study.fsutil import atomic_write_bytes, atomic_write_json
from study.layout import (
    FAILED_FILE,
    NORMS_FILE,
    PER_CLASS_COLUMNS,
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
)
from study.results.records import csv_text

COUNTS = [50, 30, 20, 12, 8, 5]
MANY, FEW = 25, 10  # classes 0-1 many, 2-3 medium, 4-5 few
GROUP = ["many", "many", "medium", "medium", "few", "few"]

TEST = {
    ("stage1", "naive"): {
        "all": [0.500, 0.520, 0.510],
        "many": [0.900, 0.910, 0.920],
        "medium": [0.500, 0.480, 0.520],
        "few": [0.100, 0.140, 0.120],
    },
    ("stage1", "tuned"): {
        "all": [0.560, 0.580, 0.570],
        "many": [0.920, 0.930, 0.910],
        "medium": [0.560, 0.550, 0.570],
        "few": [0.200, 0.220, 0.240],
    },
    ("stage2", "tau-norm"): {
        "all": [0.600, 0.610, 0.620],
        "many": [0.880, 0.870, 0.890],
        "medium": [0.600, 0.610, 0.630],
        "few": [0.300, 0.320, 0.340],
    },
    ("stage2", "wb"): {
        "all": [0.640, 0.655, 0.650],
        "many": [0.920, 0.925, 0.915],
        "medium": [0.640, 0.660, 0.650],
        "few": [0.360, 0.380, 0.370],
    },
}
TEST[("stage2", "none")] = TEST[("stage1", "tuned")]

NORMS = {
    "naive": [2.0, 1.8, 1.6, 1.4, 1.2, 1.0],
    "tuned": [1.6, 1.5, 1.4, 1.3, 1.2, 1.1],
    "none": [1.6, 1.5, 1.4, 1.3, 1.2, 1.1],
    "tau-norm": [1.2, 1.18, 1.16, 1.14, 1.12, 1.10],
    "wb": [1.0, 0.99, 1.0, 0.98, 0.99, 0.97],
    "lws": [1.0] * 6,
}
TAU = {"tau-norm": [1.0, 1.2, 1.1]}
TRAINED = ("naive", "tuned", "wb")
"""Methods whose trials train and so write their per-epoch weight norms (weight_norms.json)."""

# (experiment, method, trial index, status, params, objective, selected, reason)
TRIALS = [
    ("stage1", "naive", 0, "completed", {}, 0.50, True, None),
    ("stage1", "tuned", 1, "completed", {"weight_decay": 1e-4}, 0.55, False, None),
    ("stage1", "tuned", 2, "completed", {"weight_decay": 1e-3}, 0.57, True, None),
    ("stage1", "tuned", 3, "diverged", {"weight_decay": 5e-3}, None, False, "loss became NaN at epoch 2"),
    ("stage1", "tuned", 4, "completed", {"weight_decay": 3e-5}, 0.53, False, None),
    ("stage2", "none", 0, "completed", {}, 0.57, True, None),
    ("stage2", "tau-norm", 1, "completed", {}, 0.60, True, None),
    ("stage2", "wb", 2, "completed", {"weight_decay": 1e-2, "maxnorm_threshold": 0.1}, 0.62, False, None),
    ("stage2", "wb", 3, "completed", {"weight_decay": 5e-2, "maxnorm_threshold": 0.3}, 0.66, True, None),
    (
        "stage2",
        "wb",
        4,
        "failed",
        {"weight_decay": 1e-3, "maxnorm_threshold": 0.5},
        None,
        False,
        "RuntimeError: boom (raised on every retry)",
    ),
    ("stage2", "wb", 5, "completed", {"weight_decay": 2e-2, "maxnorm_threshold": 0.2}, 0.64, False, None),
    ("stage2", "wb", 6, "completed", {"weight_decay": 3e-1, "maxnorm_threshold": 0.9}, 0.58, False, None),
]
INTERRUPTED_TRIALS = [("stage2", "lws", 7, "interrupted", {"lr": 0.1}, None, False, None)]

SEARCH = {
    "stage1": {"weight_decay": {"loguniform": [1e-5, 1e-2], "default": 5e-4}},
    "wb": {
        "weight_decay": {"loguniform": [1e-4, 1.0], "default": 0.1},
        "maxnorm_threshold": {"uniform": [0.0, 1.0], "default": 0.1},
    },
    "lws": {"lr": {"loguniform": [0.01, 1.0], "default": 0.1}},
}


def trial_id(exp: str, index: int) -> str:
    return f"{exp[-1]}{index:07x}"


def norms(method: str, seed_pos: int, trial: int = 0) -> list[float]:
    """Per-class weight norms: the method's profile, a little tilted per seed and trial."""
    base = np.asarray(NORMS[method])
    return [float(x) for x in base + 0.02 * seed_pos * np.arange(6) / 5 + 0.01 * trial]


def balance(w: list[float]) -> dict:
    w = np.asarray(w)
    return {
        "norm_ratio": float(w.max() / w.min()),
        "norm_cv": float(w.std() / w.mean()),
        "norm_spearman": float(stats.spearmanr(COUNTS, w)[0]),
    }


def per_class_acc(overall: float) -> list[float]:
    return [float(np.clip(overall + 0.3 - 0.12 * c, 0, 1)) for c in range(6)]


def header(name: str, seeds: tuple, protocol: str, interrupted: bool) -> dict:
    stage2 = {"none": 1, "tau-norm": 1, "wb": 5} | ({"lws": 2} if interrupted else {})
    return {
        "study": name,
        "fingerprint": "0123456789abcdef",
        "protocol": protocol,
        "space": {
            "space": name,
            "protocol": protocol,
            "seeds": list(seeds),
            "data": {"dataset": "toy-lt", "imbalance_factor": 10.0},
            "stage1": {
                "config": {"epochs": 3},
                "search": SEARCH["stage1"],
                "budget": 4,
                "scheduler": None,
                "baseline": True,
            },
            "stage2": {
                m: {"config": {"epochs": 2}, "search": SEARCH.get(m, {}), "budget": b, "scheduler": None}
                for m, b in stage2.items()
            },
        },
        "experiments": [
            {
                "name": "stage1",
                "stage": "stage1",
                "budget": 5,
                "methods": {
                    "naive": {"budget": 1, "searched": []},
                    "tuned": {"budget": 4, "searched": ["weight_decay"]},
                },
            },
            {
                "name": "stage2",
                "stage": "stage2",
                "budget": sum(stage2.values()),
                "methods": {m: {"budget": b, "searched": list(SEARCH.get(m, {}))} for m, b in stage2.items()},
            },
        ],
        "data": {
            "dataset": "toy-lt",
            "imbalance_factor": 10.0,
            "num_classes": 6,
            "train_counts": COUNTS,
            "many_threshold": MANY,
            "few_threshold": FEW,
            "selection_split": "test" if protocol == "wb-parity" else "val",
            "subset_hash": "feedbeef",
        },
        "backbone": "toy_cnn",
        "provenance": {"created": "2026-01-01T00:00:00+0000"},
    }


def make_study(
    root: Path,
    seeds: tuple = (0, 1, 2),
    interrupted: bool = False,
    trials_csv: bool = True,
    optuna_db: bool = False,
    protocol: str = "honest",
    name: str = "toy-lt",
) -> Path:
    """Write the synthetic study into ``root`` (created) and return it."""
    assert len(seeds) <= 3, "the known values cover at most 3 seeds"
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = StudyPaths(root)
    head = header(name, seeds, protocol, interrupted)
    StudyHeader.from_dict(head).write(paths.study_yaml)
    trials = TRIALS + (INTERRUPTED_TRIALS if interrupted else [])
    rows, per_class, finals, selected = [], [], {}, {}
    for exp, method, index, status, params, objective, is_sel, reason in trials:
        tid = trial_id(exp, index)
        tdir = paths.trial_dir(exp, index, tid)
        TrialInfo(method=method, params=params).write(tdir / TrialInfo.FILE)
        has_test = is_sel and not (interrupted and method == "wb")
        per_seed, final = {}, {}
        for pos, seed in enumerate(seeds):
            ok = objective is not None
            sel_all = objective + (pos - (len(seeds) - 1) / 2) * 0.01 if ok else None
            sel = {
                g: (sel_all + {"all": 0, "many": 0.3, "medium": 0.05, "few": -0.3}[g] if ok else None)
                for g in ("all", "many", "medium", "few")
            }
            w = norms(method, pos, 0 if is_sel else index) if ok else None
            bal = balance(w) if ok else {}
            test = {g: TEST[(exp, method)][g][pos] for g in ("all", "many", "medium", "few")} if has_test else {}
            tau = TAU.get(method, [None] * 3)[pos]
            radius = 1.2 if method == "wb" and ok else None
            rows.append(
                TrialRow(
                    study=name,
                    stage=exp,
                    experiment=exp,
                    method=method,
                    trial=index,
                    trial_id=tid,
                    seed=seed,
                    status=status,
                    reason=reason,
                    selected=is_sel,
                    objective=objective,
                    best_epoch=2 if ok else None,
                    epochs_run=3 if ok else 1,
                    resumed_from_epoch=0,
                    selection_split=head["data"]["selection_split"],
                    **{f"sel_{g}": v for g, v in sel.items()},
                    **{f"test_{g}": v for g, v in test.items()},
                    **{k: bal.get(k) for k in ("norm_ratio", "norm_cv", "norm_spearman")},
                    maxnorm_radius=radius,
                    tau=tau,
                    params=params,
                ).to_dict()
            )
            if ok:
                per_seed[str(seed)] = {
                    "best_epoch": 2,
                    "epochs_run": 3,
                    "selection": {**sel, "per_class": per_class_acc(sel_all)},
                    "weight_norms": w,
                    "balance": bal,
                    "maxnorm_radius": radius,
                    "tau": tau,
                }
            if has_test:
                final[str(seed)] = {**test, "per_class": per_class_acc(test["all"])}
            if is_sel:
                per_class += [
                    PerClassRow(
                        study=name,
                        stage=exp,
                        experiment=exp,
                        method=method,
                        seed=seed,
                        klass=c,
                        train_count=n,
                        group=GROUP[c],
                        sel_acc=per_class_acc(sel_all)[c],
                        test_acc=per_class_acc(test["all"])[c] if has_test else None,
                        weight_norm=w[c],
                    ).to_dict()
                    for c, n in enumerate(COUNTS)
                ]
        if status in ("completed", "diverged"):
            TrialRecord(
                status=status,
                reason=reason,
                stage=exp,
                experiment=exp,
                trial_index=index,
                params=params,
                seeds=list(seeds),
                objective=objective,
                epochs_run=3,
                per_seed=per_seed,
            ).write(tdir / TrialRecord.FILE)
        if status == "completed" and method in TRAINED:  # per-epoch norms, growing to the final ones
            atomic_write_json(
                tdir / NORMS_FILE,
                {
                    str(seed): [
                        [0.5 * (e + 1) / 3 * n + 0.5 * n for n in norms(method, pos, 0 if is_sel else index)]
                        for e in range(3)
                    ]
                    for pos, seed in enumerate(seeds)
                },
            )
        elif status == "failed":
            atomic_write_json(tdir / FAILED_FILE, {"reason": reason})
        if is_sel:
            selected.setdefault(exp, {})[method] = Selection(
                trial_id=tid, trial_index=index, dir=str(tdir), objective=objective, params=params
            ).to_dict()
            if has_test:
                finals[(exp, method)] = FinalReport(
                    experiment=exp,
                    method=method,
                    trial_id=tid,
                    trial_index=index,
                    params=params,
                    objective=objective,
                    per_seed=final,
                )
    for exp, sel in selected.items():
        StageMarker(experiment=exp, selected=sel, finished=0.0).write(paths.stage_marker(exp))
    for (exp, method), final in finals.items():
        final.write(paths.final_file(exp, method))
    if trials_csv:
        atomic_write_bytes(paths.trials_csv, csv_text(rows, TRIALS_COLUMNS).encode())
        atomic_write_bytes(paths.per_class_csv, csv_text(per_class, PER_CLASS_COLUMNS).encode())
    if optuna_db:
        write_optuna(root, head, trials)
    if not interrupted:
        atomic_write_json(paths.done, {"finished": 0.0, "fingerprint": head["fingerprint"]})
    return root


def write_optuna(root: Path, head: dict, trials: list) -> None:
    """optuna.db as ``study.results.records.export_optuna`` lays it out: one study per stage and method
    (``study.results.records.optuna_study_name``)."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{root / 'optuna.db'}")
    state = {"completed": TrialState.COMPLETE, "diverged": TrialState.FAIL, "failed": TrialState.FAIL}
    for exp in head["experiments"]:
        for method in exp["methods"]:
            study = optuna.create_study(study_name=f"{exp['name']}-{method}", storage=storage, direction="maximize")
            space = (
                SEARCH["stage1"]
                if exp["stage"] == "stage1" and method == "tuned"
                else SEARCH.get(method, {})
                if exp["stage"] == "stage2"
                else {}
            )
            dists = {
                k: FloatDistribution(*v.get("loguniform", v.get("uniform")), log="loguniform" in v)
                for k, v in space.items()
            }
            for e, m, _, status, params, objective, _, _ in trials:
                if e == exp["name"] and m == method and status in state:
                    study.add_trial(
                        create_trial(
                            params=params,
                            distributions={k: dists[k] for k in params},
                            value=objective if status == "completed" else None,
                            state=state[status],
                            user_attrs={"status": status},
                        )
                    )
    storage.engine.dispose()
