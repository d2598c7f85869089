"""A study's results loaded for the tables, plots and reports: its header (study.yaml) and its
long-format rows (trials.csv, per_class.csv) as data frames with fixed dtypes (:class:`Results`).

Reads files only — never Ray, torch or a GPU — so it works on a finished study, an interrupted one
and one that is still running (when trials.csv is not written yet the rows are rebuilt from the trial
folders by :func:`study.results.records.collect`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from study.config.methods import ABLATION_ORDER
from study.layout import (
    NUMERIC_COLUMNS,
    PER_CLASS_COLUMNS,
    TRIALS_COLUMNS,
    ExperimentInfo,
    StudyHeader,
    StudyPaths,
    load_header,
)
from study.results.records import collect
from study.results.tables import _missing


@dataclass
class Results:
    """A study's header and long-format tables, with the lookups every table needs."""

    paths: StudyPaths
    header: StudyHeader
    trials: pd.DataFrame
    per_class: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    """Sentences about where the rows came from (e.g. rebuilt from the trial folders)."""
    complete: bool = False
    """The study finished (done.json, or the driver is writing the tables of a finished study)."""

    @property
    def experiments(self) -> list[ExperimentInfo]:
        return list(self.header.experiments)

    @property
    def seeds(self) -> list[int]:
        return self.header.seeds or sorted(self.trials["seed"].dropna().unique())

    def experiment(self, stage: str) -> ExperimentInfo | None:
        """The first experiment of a stage (``stage1``/``stage2``)."""
        return self.header.experiment(stage)

    @staticmethod
    def searched(exp: ExperimentInfo, method: str) -> list[str]:
        """The parameters the study searched for ``method`` in ``exp`` (empty: nothing searched)."""
        info = exp.methods.get(method)
        return list(info.searched) if info else []

    def methods(self, exp: ExperimentInfo) -> list[str]:
        """The experiment's methods in table order, including any found only in the rows."""
        names = list(exp.methods)
        names += [m for m in self.rows(exp)["method"].unique() if m not in names]
        order = ["naive", "tuned"] if exp.stage == "stage1" else ABLATION_ORDER
        return sorted(names, key=lambda m: (order.index(m) if m in order else len(order), names.index(m)))

    def rows(self, exp: ExperimentInfo, method: str | None = None) -> pd.DataFrame:
        df = self.trials[self.trials["experiment"] == exp.name]
        return df if method is None else df[df["method"] == method]

    def selected(self, exp: ExperimentInfo, method: str) -> pd.DataFrame:
        """The selected configuration's rows, one per seed."""
        df = self.rows(exp, method)
        return df[df["selected"]].sort_values("seed")

    def trial_list(self, exp: ExperimentInfo, method: str | None = None) -> pd.DataFrame:
        """One row per trial (the per-seed rows repeat the trial's status, objective and params)."""
        return self.rows(exp, method).drop_duplicates("trial_id").sort_values("trial")

    def param_columns(self) -> list[str]:
        return [c for c in self.trials.columns if c.startswith("param.")]


def as_results(study: str | os.PathLike | Results) -> Results:
    """``study`` itself when already loaded (writers called one after another share one load)."""
    return study if isinstance(study, Results) else load_results(study)


def load_results(root: str | os.PathLike, complete: bool | None = None) -> Results:
    """Load a study folder. Raises :class:`UserError` (via ``load_header``) on a folder that is not
    a study; rebuilds the rows from the trial folders when trials.csv is absent or unreadable.
    ``complete``: whether the study finished (default: it has done.json)."""
    paths, header = load_header(root)
    notes: list[str] = []
    trials = per_class = None
    if paths.trials_csv.is_file():
        try:
            trials = pd.read_csv(paths.trials_csv)
            per_class = pd.read_csv(paths.per_class_csv) if paths.per_class_csv.is_file() else None
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
            trials, per_class = None, None
            notes.append("Unreadable trials.csv: rows rebuilt from the trial folders.")
    else:
        notes.append("No trials.csv yet: rows rebuilt from the trial folders.")
    if trials is None:
        rows, pc_rows = collect(paths, header)
        trials, per_class = pd.DataFrame(rows), pd.DataFrame(pc_rows)
    if per_class is None:
        per_class = pd.DataFrame()
    return Results(
        paths,
        header,
        _normalise(trials, TRIALS_COLUMNS),
        _normalise(per_class, PER_CLASS_COLUMNS),
        notes,
        paths.done.exists() if complete is None else complete,
    )


def _normalise(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Fixed dtypes whatever the source: CSV cells may be empty, collect() gives None."""
    df = df.copy()
    for c in columns:
        if c not in df.columns:
            df[c] = np.nan
    for c in df.columns:
        if c == "selected":
            df[c] = df[c].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0")).astype(bool)
            continue
        num = pd.to_numeric(df[c], errors="coerce")
        # a searched parameter is a number unless it is categorical (some value is not numeric)
        if c in NUMERIC_COLUMNS or (
            c.startswith("param.") and num.notna().sum() == df[c].map(lambda v: not _missing(v)).sum()
        ):
            df[c] = num.astype(float)
        else:
            df[c] = df[c].map(lambda v: "" if _missing(v) else str(v)).astype(object)
    return df
