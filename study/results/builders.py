"""The paper-style tables of a study (``study table``; written to ``STUDY/tables/``
when a study finishes).

Reads study.yaml, trials.csv, per_class.csv and optuna.db only — never Ray, torch or a GPU — so it
works on a finished study, an interrupted one and one that is still running (when trials.csv is
not written yet the rows are rebuilt from the trial folders by :func:`study.results.records.collect`).

Every kind of table (``main``, ``ablation``, ``seeds``, ``search``) is built once as a
:class:`Table` — typed columns, rows, a caption and notes — and rendered by one function per format
(Markdown, LaTeX booktabs, CSV). Accuracies are shown in percent; ``mean ± std`` is over seeds with
the sample standard deviation (ddof=1).
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from study.config.methods import METHODS
from study.errors import UserError
from study.layout import COMPLETED, ENDED_STATUSES, FAILURE_STATUSES, ExperimentInfo
from study.results.loading import Results, as_results, load_results
from study.results.records import fmt_value, optuna_study_name
from study.results.stats import paired_stats, paired_test
from study.results.tables import FORMATS, RENDERERS, Column, Table, _missing, render

KINDS = ("main", "ablation", "seeds", "search", "analysis")
GROUPS = ("many", "medium", "few", "all")
TOP_K = 5
MIN_TRIALS_FOR_IMPORTANCE = 4
STAGE1_LABELS = {"naive": "CE without WD", "tuned": "CE + tuned WD"}


# --- captions and notes -------------------------------------------------------------------------------------


def variant_label(variant: str) -> str:
    """A stage-1 variant for people (the old form's ``naive``/``tuned`` by what they are)."""
    return STAGE1_LABELS.get(variant, variant)


def label(exp: ExperimentInfo, method: str) -> str:
    """Row label of a method: stage-1 variants by name, stage-2 methods from METHODS."""
    if exp.stage == "stage1":
        return variant_label(method)
    return METHODS[method].label if method in METHODS else method


def long_label(res: Results, exp: ExperimentInfo, method: str) -> str:
    """:func:`label`, naming the variant of a stage-2 method when several variants fed stage 2."""
    if exp.stage == "stage2" and len(res.header.fed_variants) > 1:
        return f"{label(exp, method)} on {variant_label(exp.variant or '')}"
    return label(exp, method)


def _stage_words(exp: ExperimentInfo) -> str:
    return re.sub(r"^stage(\d+)$", r"stage \1", str(exp.stage or exp.name))


def _context(res: Results, spread: bool = True) -> str:
    data = res.header.data
    ifac = data.imbalance_factor
    ifac = f"{ifac:g}" if isinstance(ifac, (int, float)) else str(ifac)
    seeds = res.seeds
    return (
        f"{data.dataset or '?'} (imbalance factor {ifac}, {data.num_classes or '?'} classes), "
        f"backbone {res.header.backbone or '?'}, "
        + ("mean ± std over " if spread and len(seeds) > 1 else "")
        + f"{len(seeds)} seed{'s' * (len(seeds) != 1)} ({', '.join(str(s) for s in seeds)})"
    )


def _protocol(res: Results) -> str:
    protocol = res.header.protocol
    split = res.header.data.selection_split or ("test" if protocol in ("wb-parity", "test-selection") else "val")
    if split == "test":
        return (
            f"Hyperparameters and epochs were selected on the test set, as in the reference code "
            f"(protocol {protocol}, no validation split), so test accuracies are optimistic."
        )
    return (
        f"Hyperparameters and epochs were selected on a validation split carved from the training data "
        f"(protocol {protocol}); the test set was evaluated once per selected configuration."
    )


def selected_hyperparameters(res: Results, exp: ExperimentInfo, method: str) -> str:
    """``name = value`` of the selected configuration's searched parameters, and the per-seed τ of
    post-hoc methods; empty when nothing was selected or searched."""
    sel = res.selected(exp, method)
    if sel.empty:
        return ""
    searched = res.searched(exp, method)
    cols = sorted(res.param_columns(), key=lambda c: (searched.index(c[6:]) if c[6:] in searched else len(searched), c))
    parts = [f"{c[6:]} = {fmt_value(sel[c].iloc[0])}" for c in cols if not _missing(sel[c].iloc[0])]
    taus = sel["tau"].dropna()
    if len(taus):
        vals = [fmt_value(t) for t in taus]
        parts.append(
            f"τ = {vals[0]}"
            if len(set(vals)) == 1
            else f"τ = {'/'.join(vals)} (seeds {'/'.join(str(int(s)) for s in sel.loc[taus.index, 'seed'])})"
        )
    return ", ".join(parts)


def notes(res: Results) -> list[str]:
    """Failed/diverged trials per stage and what an unfinished study is missing."""
    out = list(res.notes)
    failures = []
    for exp in res.experiments:
        t = res.trial_list(exp)
        counts = [(int((t["status"] == s).sum()), s) for s in FAILURE_STATUSES]
        words = [f"{n} {s}" for n, s in counts if n]
        if words:
            first = words[0].split(" ", 1)
            words[0] = f"{first[0]} trial{'s' * (first[0] != '1')} {first[1]}"
            failures.append(f"{', '.join(words)} in {_stage_words(exp)}")
    if failures:
        out.append(f"Failures: {'; '.join(failures)}.")
    missing = missing_parts(res)
    if missing:
        out.append(f"Missing: {'; '.join(missing)}.")
    return out


def missing_parts(res: Results) -> list[str]:
    """What an interrupted or running study has not produced yet (empty for a complete one)."""
    done = res.complete
    out = [] if done else ["study not finished (no done.json)"]
    for exp in res.experiments:
        for m in res.methods(exp):
            key = f"{exp.name}/{m}"
            trials = res.trial_list(exp, m)
            budget = exp.methods[m].budget if m in exp.methods else None
            finished = int(trials["status"].isin(ENDED_STATUSES).sum())
            if trials.empty:
                out.append(f"{key} has no trials")
                continue
            unfinished = not done and budget and finished < budget
            if not (trials["status"] == COMPLETED).any():
                out.append(
                    f"{key} has no completed trial" + (f" ({finished} of {budget} finished)" if unfinished else "")
                )
                continue
            if unfinished:
                out.append(f"{key} finished {finished} of {budget} trials")
            sel = res.selected(exp, m)
            if sel.empty:
                out.append(f"selected configuration of {key}")
                continue
            lacking = [int(s) for s in sel.loc[sel["test_all"].isna(), "seed"]]
            if len(lacking) == len(sel):
                out.append(f"final test evaluation of {key}")
            elif lacking:
                out.append(
                    f"final test evaluation of {key} (seed{'s' * (len(lacking) > 1)} {', '.join(map(str, lacking))})"
                )
    return out


def _means(res: Results, exp: ExperimentInfo, methods) -> dict[str, float]:
    means = {m: res.selected(exp, m)["test_all"].mean() for m in methods}
    return {m: v for m, v in means.items() if math.isfinite(v)}


def significance(res: Results, exps: list[ExperimentInfo] | None = None) -> str:
    """Within each stage-2 experiment (one per fed variant): WB against the best other stage-2 method
    (highest mean test All). Across variants (when several fed stage 2): under each method, the best
    variant against the runner-up. See :func:`paired_test`."""
    exps = res.header.stage2_experiments() if exps is None else exps
    if not exps:
        return "Significance: the study has no stage 2."
    several = len(res.header.fed_variants) > 1
    out = []
    for exp in exps:
        on = f" on {variant_label(exp.variant or '')}" if several else ""
        if "wb" not in res.methods(exp):
            out.append(f"Significance{on}: no wb (CB + WD + MaxNorm) method, so no test was made.")
            continue
        wb = res.selected(exp, "wb")
        if wb["test_all"].dropna().empty:
            out.append(f"Significance{on}: wb has no test results yet, so no test was made.")
            continue
        means = _means(res, exp, [m for m in res.methods(exp) if m != "wb"])
        if not means:
            out.append(f"Significance{on}: no other stage-2 method has test results to compare wb with.")
            continue
        other = max(means, key=means.get)
        out.append(
            paired_test(
                f"Significance{on}: WB vs {label(exp, other)} (the best other stage-2 method by mean test All)",
                wb,
                res.selected(exp, other),
            )
        )
        if "none" in res.methods(exp):  # what stage 2 adds where it matters most: the tail
            out.append(paired_test(f"WB vs the stage-1 classifier{on}", wb, res.selected(exp, "none"), "test_few"))
    if len(exps) > 1:
        methods = [m for m in res.methods(exps[0]) if all(m in res.methods(e) for e in exps[1:])]
        for m in methods:
            by_variant = {e.variant: res.selected(e, m)["test_all"].mean() for e in exps}
            by_variant = {v: x for v, x in by_variant.items() if math.isfinite(x)}
            if len(by_variant) < 2:
                continue
            best, second = sorted(by_variant, key=by_variant.get, reverse=True)[:2]
            e_of = {e.variant: e for e in exps}
            out.append(
                paired_test(
                    f"Variants under {label(exps[0], m)}: {variant_label(best)} vs "
                    f"{variant_label(second)} (the best two by mean test All)",
                    res.selected(e_of[best], m),
                    res.selected(e_of[second], m),
                )
            )
    return " ".join(out)


# --- the tables ---------------------------------------------------------------------------------------------

LEAD = [
    Column("stage_n", "Stage", show="display"),
    Column("stage", "stage", show="csv"),
    Column("variant", "variant", show="csv"),
    Column("variant_label", "Variant", show="display"),
    Column("method", "method", show="csv"),
    Column("label", "Method"),
]
ACC_COLUMNS = [Column(g, g.capitalize(), "stat", 2, bold_max=True) for g in GROUPS]
NORM_COLUMNS = [
    Column("norm_ratio", "Max/min norm", "stat", 2),
    Column("norm_cv", "Norm CV", "stat", 3),
    Column("norm_spearman", "Spearman ρ", "stat", 3),
]


def _lead(exp: ExperimentInfo, method: str) -> dict[str, Any]:
    """The leading cells of a row: stage, variant (the representation), method (the classifier). A
    stage-1 row is its variant's own jointly trained classifier."""
    variant = exp.variant_of(method)
    return {
        "stage_n": _stage_words(exp).replace("stage ", ""),
        "stage": exp.name,
        "variant": variant,
        "variant_label": variant_label(variant),
        "method": method,
        "label": METHODS["none"].label if exp.stage == "stage1" else label(exp, method),
    }


def _cells(cols: list[Column], values: dict[str, Any], row: pd.Series | None = None) -> list[Any]:
    """A row's cells: named values first, else the trials.csv column (accuracies in percent)."""

    def get(key: str) -> Any:
        if key in values:
            return values[key]
        v = row.get(key) if row is not None else None
        return v * 100 if key.startswith(("test_", "sel_")) and not _missing(v) else v

    return [get(c.key) for c in cols]


def _per_method(res: Results, exps: list[ExperimentInfo], cols: list[Column]) -> tuple[list[list[Any]], list[int]]:
    """One row per (experiment, method) of the selected configuration: stat columns hold the per-seed
    values (test accuracies in percent, norm statistics as they are)."""
    rows, breaks = [], []
    for exp in exps:
        breaks.append(len(rows))
        for m in res.methods(exp):
            sel = res.selected(exp, m)
            stats = {
                c.key: sel[f"test_{c.key}" if c.key in GROUPS else c.key].to_numpy(dtype=float)
                * (100 if c.key in GROUPS else 1)
                for c in cols
                if c.kind == "stat"
            }
            rows.append(_cells(cols, {**_lead(exp, m), **stats, "n_seeds": int(sel["test_all"].notna().sum())}))
    return rows, breaks


def split_word(res: Results) -> str:
    """``validation`` or ``test``: the split that selected hyperparameters and epochs."""
    return "test" if res.header.data.selection_split == "test" else "validation"


def _name(res: Results, kind: str) -> str:
    return f"{res.header.study or 'study'}-{kind}"


def _fed_words(res: Results, exps: list[ExperimentInfo] | None = None) -> str:
    fed = [variant_label(e.variant or "") for e in (exps if exps is not None else res.header.stage2_experiments())]
    if not fed:
        return "no stage-1 variant"
    return f"the stage-1 {'model' if len(fed) == 1 else 'models'} {', '.join(fed)}"


def main_table(res: Results) -> Table:
    """The grid of representation × classifier (Kang et al.'s layout): one row per stage-1 variant
    (its own classifier), then one row per (fed variant, stage-2 method); test Many/Medium/Few/All,
    mean ± std over seeds, best in bold."""
    exps = [e for e in res.experiments if e.stage in ("stage1", "stage2")]
    cols = LEAD + [Column("n_seeds", "n_seeds", "int", show="csv")] + ACC_COLUMNS
    rows, breaks = _per_method(res, exps, cols)
    hp = [
        f"{long_label(res, e, m)}: {s}"
        for e in exps
        for m in res.methods(e)
        if (s := selected_hyperparameters(res, e, m))
    ]
    caption = (
        f"Test accuracy (%) on {_context(res)}; best per column in bold. Stage-1 rows are each variant's "
        f"jointly trained classifier; stage-2 methods adjust or re-train the classifier of "
        f"{_fed_words(res)}. {_protocol(res)} "
        f"Selected hyperparameters: {'; '.join(hp) if hp else 'none searched'}."
    )
    return Table(_name(res, "main"), cols, rows, caption, notes(res), breaks)


def ablation_table(res: Results, variant: str | None = None) -> Table:
    """The stage-2 methods on each fed variant (or only ``variant``) with accuracy and weight-norm
    balance columns, and the significance tests in the caption."""
    exps = res.header.stage2_experiments()
    if variant is not None:
        fed = [e.variant for e in exps]
        if variant not in fed:
            from study.errors import unknown

            raise UserError(f"--variant {variant}: " + unknown("variant that fed stage 2", variant, fed))
        exps = [e for e in exps if e.variant == variant]
    cols = LEAD[1:] + [Column("n_seeds", "n_seeds", "int", show="csv")] + ACC_COLUMNS + NORM_COLUMNS
    rows, breaks = _per_method(res, exps, cols)
    caption = (
        f"Stage-2 ablation on {_fed_words(res, exps)}: test accuracy (%) and balance of the "
        f"per-class classifier weight norms (max/min ratio, coefficient of variation, Spearman ρ between "
        f"class training count and norm) on {_context(res)}; best accuracy per column in bold. "
        f"{_protocol(res)} {significance(res, exps)}"
    )
    name = _name(res, "ablation") + (f"-{variant}" if variant else "")
    return Table(name, cols, rows, caption, notes(res), breaks)


def seeds_table(res: Results) -> Table:
    """One row per method and seed of the selected configurations, to show the spread."""
    cols = LEAD + [
        Column("seed", "Seed", "int"),
        Column("trial", "Trial", "int"),
        *[Column(f"test_{g}", g.capitalize(), "num", 2) for g in GROUPS],
        Column("sel_all", "Sel. All", "num", 2),
        Column("best_epoch", "Best epoch", "int"),
        Column("norm_ratio", "Max/min norm", "num", 2),
        Column("norm_cv", "Norm CV", "num", 3),
        Column("norm_spearman", "Spearman ρ", "num", 3),
    ]
    rows, breaks = [], []
    for exp in res.experiments:
        breaks.append(len(rows))
        for m in res.methods(exp):
            rows += [_cells(cols, _lead(exp, m), r) for _, r in res.selected(exp, m).iterrows()]
    caption = (
        f"Per-seed results of each method's selected configuration on {_context(res, False)}: test "
        f"accuracy (%), {split_word(res)}-split All accuracy (Sel. All, %), best epoch and weight-norm "
        f"balance. {_protocol(res)}"
    )
    return Table(_name(res, "seeds"), cols, rows, caption, notes(res), breaks)


def search_table(res: Results, k: int = TOP_K) -> Table:
    """The top-k trials by objective of each stage/method that searched parameters, with Optuna's
    parameter importances (from optuna.db) in the notes."""
    searched = [(e, m) for e in res.experiments for m in res.methods(e) if res.searched(e, m)]
    params: list[str] = []
    for e, m in searched:
        params += [p for p in res.searched(e, m) if p not in params]
    cols = LEAD + [
        Column("rank", "Rank", "int"),
        Column("trial", "Trial", "int"),
        Column("status", "Status"),
        Column("selected", "Selected"),
        Column("objective", "Objective", "num", 2),
        *[Column(f"param.{p}", p, "num", None) for p in params],
    ]
    rows, breaks = [], []
    for e, m in searched:
        breaks.append(len(rows))
        top = (
            res.trial_list(e, m)
            .dropna(subset=["objective"])
            .sort_values(["objective", "trial"], ascending=[False, True])
            .head(k)
        )
        rows += [
            _cells(
                cols,
                {
                    **_lead(e, m),
                    "rank": rank,
                    "selected": "yes" if r["selected"] else "",
                    "objective": r["objective"] * 100,
                },
                r,
            )
            for rank, (_, r) in enumerate(top.iterrows(), 1)
        ]
    caption = (
        f"Top-{k} trials of each searched stage and method by objective (mean over seeds of "
        f"{split_word(res)}-split All accuracy, %) on {_context(res, False)}, with the searched "
        f"hyperparameters; Selected marks the chosen configuration."
    )
    if not searched:
        caption += " No stage or method searched any parameter."
    return Table(_name(res, "search"), cols, rows, caption, notes(res) + importances(res, searched), breaks)


def importances(res: Results, searched: list[tuple[ExperimentInfo, str]]) -> list[str]:
    """One line per searched stage/method: Optuna's (fANOVA) parameter importances, or why not."""
    if not searched:
        return []
    if not res.paths.optuna_db.is_file():
        return ["Parameter importances: optuna.db not written yet."]
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{res.paths.optuna_db}")
    out = []
    try:
        for e, m in searched:
            key = f"{e.name}/{m}"
            try:
                study = optuna.load_study(study_name=optuna_study_name(e.name, m), storage=storage)
            except KeyError:
                out.append(f"Parameter importances of {key}: not in optuna.db.")
                continue
            n = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
            if n < MIN_TRIALS_FOR_IMPORTANCE:
                out.append(
                    f"Parameter importances of {key}: not computed, {n} completed trial{'s' * (n != 1)} "
                    f"(needs at least {MIN_TRIALS_FOR_IMPORTANCE})."
                )
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    imp = optuna.importance.get_param_importances(
                        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
                    )
            except (RuntimeError, ValueError) as err:
                out.append(f"Parameter importances of {key}: not computed ({err}).")
                continue
            out.append(
                f"Parameter importances of {key} (fANOVA, {n} completed trials): "
                + ", ".join(f"{p} {v:.2f}" for p, v in imp.items())
                + "."
            )
    finally:
        if hasattr(storage, "engine"):
            storage.engine.dispose()
    return out


ANALYSIS_COLUMNS = [
    Column("fdr_train", "FDR train", "stat", 2),
    Column("fdr_test", "FDR test", "stat", 2),
    Column("class_cos_train", "Class cos", "stat", 3),
    Column("class_cos_centred_test", "Centred cos", "stat", 3),
    Column("cone_cos_test", "Cone cos", "stat", 3),
    Column("feature_norm_spearman", "Feat. norm ρ", "stat", 2),
    Column("norm_ratio", "Max/min norm", "stat", 2),
    Column("maxnorm_binding", "MaxNorm binds", "stat", 2),
    Column("maxnorm_rows_clipped", "Rows clipped", "stat", 1),
]


def analysis_table(res: Results) -> Table:
    """Why the methods work (Hasegawa & Sato): feature geometry and whether MaxNorm binds, per
    (variant, method), mean ± std over seeds."""
    exps = [e for e in res.experiments if e.stage in ("stage1", "stage2")]
    cols = LEAD + [Column("n_seeds", "n_seeds", "int", show="csv")] + ANALYSIS_COLUMNS
    rows, breaks = _per_method(res, exps, cols)
    caption = (
        f"Feature geometry and classifier balance of each selected configuration on {_context(res)}. "
        "FDR: Fisher's discriminant ratio tr(S_B)/tr(S_W) of the penultimate features on the training "
        "and the test split (higher: classes better separated). Class cos: mean pairwise cosine of the "
        "class-mean features (training split; lower: class directions further apart); Centred cos: the "
        "same for class means minus the global mean (test split; −1/(C−1) for a simplex). Cone cos: mean "
        "cosine of the test features to their global mean (the cone effect). Feat. norm ρ: Spearman ρ "
        "between a class's mean feature norm (training split) and its training count. Max/min norm: of "
        "the classifier's per-class weight norms. MaxNorm binds: the fraction of MaxNorm projections that "
        "clipped at least one row (0: the constraint never acted); Rows clipped: the mean number of rows "
        "a projection clipped; both empty for methods without MaxNorm. Stage-2 methods run on the frozen "
        f"backbone of their variant, so their feature columns repeat the variant's. {_protocol(res)}"
    )
    return Table(_name(res, "analysis"), cols, rows, caption, notes(res), breaks)


BUILDERS = {
    "main": main_table,
    "ablation": ablation_table,
    "seeds": seeds_table,
    "search": search_table,
    "analysis": analysis_table,
}


def build_table(res: Results, kind: str, variant: str | None = None) -> Table:
    """The table of one kind (``main``, ``ablation``, ``seeds`` or ``search``); ``variant`` restricts
    the ablation to one fed variant."""
    if kind not in BUILDERS:
        raise UserError(f"unknown table kind {kind!r}; valid: {', '.join(BUILDERS)}")
    if variant is not None:
        if kind != "ablation":
            raise UserError(f"--variant applies to --kind ablation only (not {kind})")
        return ablation_table(res, variant)
    return BUILDERS[kind](res)


def compare_table(a: Results, b: Results) -> Table:
    """Two studies of the same experiments and seeds — typically one space under ``honest`` and
    under ``test-selection`` — compared per (variant, method): the paired difference a − b of test
    All and Few accuracy over the seeds both evaluated, with its 95% confidence interval (t
    distribution). Under test-set selection the difference is how much selecting on the test set
    inflates the reported numbers."""
    cols = LEAD + [
        Column("n", "Seeds", "int"),
        Column("d_all", "Δ All", "num", 2),
        Column("ci_all", "95% CI (All)"),
        Column("d_few", "Δ Few", "num", 2),
        Column("ci_few", "95% CI (Few)"),
    ]
    other = {e.name: e for e in b.experiments}
    rows, breaks = [], []
    for exp in a.experiments:
        if exp.name not in other:
            continue
        breaks.append(len(rows))
        for m in a.methods(exp):
            if m not in b.methods(other[exp.name]):
                continue
            cells = {**_lead(exp, m)}
            for g in ("all", "few"):
                st = paired_stats(a.selected(exp, m), b.selected(other[exp.name], m), f"test_{g}")
                cells["n"] = st["n"]
                cells[f"d_{g}"] = st["mean"] if st["n"] else None
                cells[f"ci_{g}"] = (
                    f"[{st['mean'] - st['half']:+.2f}, {st['mean'] + st['half']:+.2f}]"
                    if st["half"] is not None
                    else "–"
                )
            rows.append(_cells(cols, cells))

    def who(r: Results) -> str:
        return f"{r.header.study} (protocol {r.header.protocol}, selection on the {split_word(r)} split)"

    caption = (
        f"Test accuracy of {who(a)} minus that of {who(b)}, in points, per stage-1 variant and "
        "method: the mean over the seeds both studies evaluated of the paired difference, and its 95% "
        "confidence interval (t distribution; – with fewer than 3 seeds). On "
        f"{_context(a, False)}."
    )
    return Table(f"{a.header.study}-vs-{b.header.study}", cols, rows, caption, [], breaks)


# --- commands -------------------------------------------------------------------------------------------------


def _emit(table: Table, fmt: str, out: str | os.PathLike | None) -> int:
    """Print ``table`` in ``fmt`` (or write it to ``out``). CSV carries no caption, so its notes
    (failures, what is missing) go to stderr."""
    if fmt not in RENDERERS:
        raise UserError(f"unknown table format {fmt!r}; valid: {', '.join(RENDERERS)}")
    text = render(table, fmt)
    if fmt == "csv":
        for n in table.notes:
            print(n, file=sys.stderr)
    if out:
        from study.fsutil import atomic_write_text

        atomic_write_text(out, text)
        print(f"wrote {out}")
    else:
        sys.stdout.write(text)
    return 0


def table_command(
    study: str | os.PathLike,
    kind: str = "main",
    fmt: str = "markdown",
    out: str | os.PathLike | None = None,
    variant: str | None = None,
) -> int:
    """``study table``: print (or write to ``out``) one table."""
    if fmt not in RENDERERS:  # before reading the study: a bad option is the first thing to hear
        raise UserError(f"unknown table format {fmt!r}; valid: {', '.join(RENDERERS)}")
    return _emit(build_table(load_results(study), kind, variant), fmt, out)


def compare_command(
    a: str | os.PathLike, b: str | os.PathLike, fmt: str = "markdown", out: str | os.PathLike | None = None
) -> int:
    """``study compare A B``: print (or write to ``out``) :func:`compare_table`."""
    return _emit(compare_table(load_results(a), load_results(b)), fmt, out)


def write_all_tables(root: str | os.PathLike | Results) -> list[Path]:
    """Every kind of table in every format under ``STUDY/tables/`` (``main.md``, ``main.tex``,
    ``main.csv``, ``ablation.md``, ...). Returns the written paths."""
    from study.fsutil import atomic_write_text

    res = as_results(root)
    written = []
    for kind in KINDS:
        table = build_table(res, kind)
        for fmt, ext in FORMATS.items():
            path = res.paths.tables / f"{kind}.{ext}"
            atomic_write_text(path, render(table, fmt))
            written.append(path)
    return written
