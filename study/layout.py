"""The on-disk format of a study: where every file lives, what it is called, the trial statuses, and
small typed views of each file. Every writer, every reader and the test fixtures use this module,
so a field is added in one place.

Layout of ``results/NAME/``::

    study.yaml                :class:`StudyHeader` — format version, resolved space, experiments,
                              data summary, provenance, fingerprint
    tune/search/              Ray Tune's one experiment for every stage (what Tuner.restore reads)
    trials/<experiment>/trial-NNNN-<id>/   one folder per trial (:func:`trial_dirname`):
        trial.json            :class:`TrialInfo` — method, parameters, resolved config
        events.jsonl          start (with the epoch it resumed from), epochs, fallbacks, the end
        ckpt/epoch-NNNN.pt    every seed's trainer state after epoch N (+ .sha256), newest two kept
        record.json           :class:`TrialRecord` — the outcome, per-seed :class:`SeedSummary`
        weight_norms.json     per-epoch per-class classifier norms of every seed (trained methods)
        failed.json           the trial raised on every retry (written by the Tune callback)
        traceback.txt         the traceback of every exception the trial raised, one block per attempt
        final-seed<S>.pt      the selected weights per seed (:func:`final_weights`)
    trials/<experiment>/.adopt/   trials missing from Tune's last snapshot, waiting to be continued
    stages/<experiment>.json  :class:`StageMarker` — the experiment finished; its selection per method
    final/<experiment>--<method>.json   :class:`FinalReport` — test-set reports of the selection, per seed
    trials.csv                one :class:`TrialRow` per stage, method, trial and seed
    per_class.csv             one :class:`PerClassRow` per class of every selected configuration and seed
    optuna.db                 SQLite Optuna storage, one study per stage and method (``stage2-wb``)
    tables/, plots/           written when the study finishes
    done.json                 the study finished
    .lock                     held while a ``study run`` works on the folder

An experiment is ``stage1`` (every stage-1 variant) or ``stage2-<variant>`` (every stage-2 method on
the variant's selected backbones). ``study train`` writes a smaller folder (:class:`TrainPaths`).

Reads files only: no Ray, no torch, no GPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.errors import UserError
from study.fsutil import atomic_write_json, json_bytes, read_json_or_none

# --- trial statuses ---------------------------------------------------------------------------------------

COMPLETED = "completed"
"""Trained to the end; its objective counts."""
DIVERGED = "diverged"
"""The loss or the weights became NaN/inf; stopped early, told to Optuna as failed, never selected."""
FAILED = "failed"
"""Raised on every retry (``search.retries``); the exception's last line is its reason."""
STOPPED = "stopped"
"""Ended early by the ASHA scheduler."""
RUNNING = "running"
"""In flight while a ``study run`` holds the study."""
INTERRUPTED = "interrupted"
"""Was in flight when the study stopped; continues from its last epoch checkpoint on resume."""
PENDING = "pending"
"""Suggested by the searcher but not started."""

STATUSES = (COMPLETED, DIVERGED, FAILED, STOPPED, RUNNING, INTERRUPTED, PENDING)
FAILURE_STATUSES = (DIVERGED, FAILED)
"""Statuses that count as failures (a NaN/inf loss; an exception after its retries)."""
ENDED_STATUSES = (COMPLETED, STOPPED, DIVERGED, FAILED)
"""Statuses of trials that used up their slot of the budget."""

# --- names ------------------------------------------------------------------------------------------------

FORMAT_VERSION = 2
"""The version of this layout, written to study.yaml (``format_version``). 1 (no field): written by
``study`` 0.1, whose interrupted studies this version does not resume (its search state pickles
classes that no longer exist); its finished studies are still read. 2: ``study`` 0.2."""

TRIAL_DIR_RE = re.compile(r"^trial-(\d+)-([0-9a-f]+(?:_\d+)?)$")
MAX_NAME_LENGTH = 100
"""Longest study name: file systems allow 255 bytes per name, and the study's own folders (moved-aside
copies, ``NAME.old-<timestamp>``) and Ray's temporary names add to it."""


EVENTS_FILE = "events.jsonl"
"""A trial's log: one JSON line per start, epoch, fallback, adoption and end."""
FAILED_FILE = "failed.json"
"""A trial that raised on every retry: its status and reason (the Tune callback writes it)."""
TRACEBACK_FILE = "traceback.txt"
"""Every exception a trial raised, with its traceback, one block per attempt (the terminal shows one line)."""
NORMS_FILE = "weight_norms.json"
"""A trained trial's per-epoch per-class classifier norms: ``{seed: [[norm per class] per epoch]}``."""
CHECKPOINTS = "ckpt"
"""A trial's per-epoch checkpoint folder."""
FAULT_COUNT_FILE = ".fault-count"
"""A trial's count of injected faults (``study.faults``, for the tests)."""
ATTEMPTS_FILE = ".attempts"
"""With a store apart from the results folder (``study.store``): a trial's count of starts, kept in the
store (the events that count them in the results folder are the driver's to write)."""
REPORT_FILES_KEY = "_files"
"""With a store apart from the results folder: the key of a trial's Tune report that carries what the
driver writes into the trial's folder for it (events, trial.json, record.json; ``study.search.mirror``)."""
ADOPT_POOL = ".adopt"
"""Inside a stage's trial folder: trials missing from Tune's last snapshot, waiting for their
method's next trial to continue them (``study.search.resume``)."""
CLAIM_FILE = "claimed_by"
"""Inside such an orphan's folder: the id of the trial that will continue it."""
OPENED_FILE = ".opened.json"
"""Inside a stage-2 experiment's trial folder: the experiment is open (:class:`ExperimentOpened`)."""


def trial_dirname(index: int, trial_id: str) -> str:
    """``trial-NNNN-<trial id>`` (NNNN: the trial's 0-based index in its experiment)."""
    return f"trial-{index:04d}-{trial_id}"


def parse_trial_dirname(name: str) -> tuple[int, str] | None:
    """(index, trial id) of a trial folder name, or None for anything else."""
    m = TRIAL_DIR_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def features_file(trial_dir, name: str) -> Path:
    """A stage-1 trial's cached fp16 features of a file dataset's split (``features-<split>-seed<S>.npy``,
    see ``study.training.features.cached_features``)."""
    return Path(trial_dir) / f"features-{name}.npy"


def final_weights(trial_dir: str | os.PathLike, seed: int) -> Path:
    """A trial's selected weights for ``seed`` (stage 1: the model's state_dict; stage 2: the head)."""
    return Path(trial_dir) / f"final-seed{seed}.pt"


CONTEXT_KEY = "_study"
"""The key of a Tune trial config's :class:`TrialContext`."""


def trial_index_in_experiment(config: dict | None, experiment_tag: str | None, trial_id: str) -> int:
    """A Tune trial's index in its own experiment: the ``index`` of its :class:`TrialContext`, else
    the counter of its experiment tag (:func:`trial_index_of`)."""
    index = ((config or {}).get(CONTEXT_KEY) or {}).get("index")
    return int(index) if index is not None else trial_index_of(experiment_tag, trial_id)


def trial_experiment(config: dict | None) -> str | None:
    """The experiment of a Tune trial, from its config's :class:`TrialContext`."""
    return ((config or {}).get(CONTEXT_KEY) or {}).get("experiment")


def searched_params(config: dict | None) -> dict:
    """A Tune trial config's searched parameters: all but ``method`` and the :class:`TrialContext`."""
    return {k: v for k, v in (config or {}).items() if k not in (CONTEXT_KEY, "method")}


def trial_index_of(experiment_tag: str | None, trial_id: str) -> int:
    """0-based index of a trial in its experiment: Tune's experiment tag starts with the 1-based
    counter ("3_weight_decay=..."); grid trial ids end with it ("ab12c_00002")."""
    head = str(experiment_tag or "").split("_", 1)[0]
    if head.isdigit():
        return int(head) - 1
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if "_" in trial_id and tail.isdigit() else 0


def check_name(name: str) -> str:
    """Study names are one folder below the results folder: no paths, no '..', not too long."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or name.startswith("~")
        or os.path.isabs(name)
        or ".." in Path(name).parts
    ):
        raise UserError(
            f"--name {name!r}: a study name must be a plain folder name (no '/', '..' or "
            "absolute paths); use --results-dir to choose where results go"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise UserError(f"--name {name[:20]}...: {len(name)} characters; use at most {MAX_NAME_LENGTH}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_', '+' and '-' only")
    return name


TUNE_EXPERIMENT = "search"
"""The name of the study's one Tune experiment (``tune/search/``)."""


class StudyPaths:
    """Where everything of a study lives (all absolute)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.tune = self.root / "tune"
        self.tune_experiment = self.tune / TUNE_EXPERIMENT
        """Ray Tune's experiment folder: one Tuner runs every stage of the study (its snapshots,
        searcher state and Tune's own trial folders)."""
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
        self.report = self.root / "report.html"
        """The one-page HTML report (``study report``; also written when the study finishes)."""
        self.plugins = self.root / "plugins"
        """Copies of the space's file plug-ins, made when the study starts; the trials import these."""

    def trial_dir(self, experiment: str, index: int, trial_id: str) -> Path:
        return self.trials / experiment / trial_dirname(index, trial_id)

    def key(self, path: str | os.PathLike) -> str:
        """A path inside the study folder as a store key (``study.store``): relative, ``/``-separated."""
        return Path(path).relative_to(self.root).as_posix()

    def adopt_pool(self, experiment: str) -> Path:
        """Trials missing from Tune's last snapshot wait here to be continued."""
        return self.trials / experiment / ADOPT_POOL

    def opened_file(self, experiment: str) -> Path:
        """Written when a dependent experiment opens: what its trials that started early wait for."""
        return self.trials / experiment / OPENED_FILE

    def stage_marker(self, experiment: str) -> Path:
        return self.stages / f"{experiment}.json"

    def final_file(self, experiment: str, method: str) -> Path:
        return self.final / f"{experiment}--{method}.json"

    def final_reports(self) -> list[str]:
        """``<stage>--<method>`` of every final report written so far."""
        return sorted(p.stem for p in self.final.glob("*.json")) if self.final.is_dir() else []


class TrainPaths:
    """The folder ``study train --out DIR`` writes (all absolute)::

    run.json              what ran: the resolved space, the stage-1 variant and stage-2 method
    stage1/               the stage-1 trial (a trial folder as in a study: record, events, weights)
    stage2-<method>/      the stage-2 trial on stage 1's selected weights
    metrics.json          per seed and mean ± std: selection-split and test accuracies, norms
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.run = self.root / "run.json"
        self.stage1 = self.root / "stage1"
        self.metrics = self.root / "metrics.json"

    def stage2(self, method: str) -> Path:
        return self.root / f"stage2-{method}"


# --- typed views of the files -------------------------------------------------------------------------------


def _from(cls: type, d: dict | None):
    """``cls`` from a mapping, ignoring keys it does not know (files written by newer versions) and
    leaving absent ones at their defaults (files written by older versions)."""
    if not isinstance(d, dict):
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


class _View:
    """Shared helpers of the file views."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None):
        return _from(cls, d)

    @classmethod
    def read(cls, path: str | os.PathLike):
        """The file's view, or None when it is missing or unreadable (a torn write)."""
        return cls.from_dict(read_json_or_none(path))

    def write(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    def to_bytes(self) -> bytes:
        """The file's bytes (what :meth:`write` writes)."""
        return json_bytes(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes | None):
        """The view of a file's bytes, or None (missing or unreadable)."""
        try:
            return cls.from_dict(json.loads(data)) if data is not None else None
        except ValueError:
            return None


@dataclass(frozen=True)
class TrialInfo(_View):
    """``trial.json``: what a trial is, written before it trains."""

    experiment: str = ""
    stage: str = ""
    method: str | None = None
    trial_id: str = ""
    trial_index: int = 0
    params: dict = field(default_factory=dict)
    """The searched parameters, as Optuna named them."""
    config: dict = field(default_factory=dict)
    """The resolved Stage1Config / Stage2Config."""

    FILE = "trial.json"


@dataclass(frozen=True)
class SeedSummary(_View):
    """One seed's outcome inside :class:`TrialRecord` (the selected epoch's numbers)."""

    best_epoch: int | None = None
    epochs_run: int | None = None
    selection: dict | None = None
    """Accuracy report on the selection split: all, many, medium, few, per_class."""
    weight_norms: list | None = None
    balance: dict | None = None
    """norm_ratio, norm_cv, norm_spearman of the classifier's per-class weight norms."""
    maxnorm_radius: float | None = None
    maxnorm_binding: float | None = None
    """The fraction of MaxNorm projections that clipped at least one row (0: the constraint never
    bound)."""
    maxnorm_rows_clipped: float | None = None
    """The mean number of rows a MaxNorm projection clipped."""
    tau: float | None = None
    tau_curve: list | None = None
    history: list | None = None
    """One line per epoch: epoch, train_loss, lr, sel_* (and tau for post-hoc methods)."""
    runtime: dict | None = None
    """Stage 1: the resolved speed settings it trained with (device, memory format, compile, TF32,
    autocast, threads): provenance for numbers that differ by float rounding."""

    KEYS = (
        "best_epoch",
        "epochs_run",
        "selection",
        "weight_norms",
        "balance",
        "maxnorm_radius",
        "maxnorm_binding",
        "maxnorm_rows_clipped",
        "tau",
        "tau_curve",
        "history",
        "runtime",
    )


@dataclass(frozen=True)
class TrialRecord(_View):
    """``record.json``: a trial's outcome (written once, when it ends)."""

    status: str = COMPLETED
    reason: str | None = None
    stage: str = ""
    experiment: str = ""
    trial_index: int = 0
    params: dict = field(default_factory=dict)
    seeds: list = field(default_factory=list)
    objective: float | None = None
    """Mean over seeds of each seed's selection accuracy at its selected epoch (None unless completed)."""
    epochs_run: int = 0
    config: dict = field(default_factory=dict)
    selection_split: str | None = None
    per_seed: dict = field(default_factory=dict)
    """str(seed) -> the :class:`SeedSummary` as a mapping."""

    FILE = "record.json"

    def seed(self, seed: int) -> SeedSummary:
        return SeedSummary.from_dict(self.per_seed.get(str(seed))) or SeedSummary()


@dataclass(frozen=True)
class Selection(_View):
    """A method's selected trial (inside :class:`StageMarker`)."""

    trial_id: str = ""
    trial_index: int = 0
    dir: str = ""
    objective: float | None = None
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StageMarker(_View):
    """``stages/<stage>.json``: the stage finished, with each method's selection (None: no trial of
    that method completed)."""

    experiment: str = ""
    selected: dict = field(default_factory=dict)
    """method -> :class:`Selection` as a mapping, or None."""
    finished: float = 0.0
    trials: list = field(default_factory=list)
    """The ids of the experiment's trials, every one of which had ended (Tune's stored snapshot
    can lag behind them: it is copied asynchronously)."""

    def selection(self, method: str) -> Selection | None:
        return Selection.from_dict(self.selected.get(method))


@dataclass(frozen=True)
class ExperimentOpened(_View):
    """``trials/<experiment>/.opened.json``: a stage-2 experiment has opened (its stage-1
    experiment ended and the study passed the between-stages point). Trials started before that, to
    keep the workers of the last stage-1 trials, wait for it."""

    stage1_dir: str | None = None
    """The selected stage-1 trial's folder; None: the variant has no selection (blocked)."""
    opened: float = 0.0


@dataclass(frozen=True)
class TrialContext(_View):
    """What a Tune trial needs besides its searched parameters and method: the ``_study`` block of
    its config (:data:`CONTEXT_KEY`). The study's searcher builds it when it proposes the trial
    (``study.search.searchers.StudySearcher``); the trainable reads it (``study.search.trainable``).
    Tune stores it with the trial, so a restored trial runs with the context it was proposed with."""

    root: str = ""
    """The study folder (absolute)."""
    experiment: str = ""
    """``stage1`` or ``stage2-<variant>``."""
    stage: str = ""
    """``stage1`` or ``stage2``."""
    index: int = 0
    """The trial's index in its experiment (the order of issue; its folder's number)."""
    config: dict = field(default_factory=dict)
    """The method's base configuration (a Stage1Config / Stage2Config as a mapping, searched
    parameters at their defaults): the trial's parameters are applied on top."""
    seeds: list = field(default_factory=list)
    """Every seed the trial trains."""
    eval: dict = field(default_factory=dict)
    """The EvalConfig as a mapping."""
    cpus_per_trial: float = 1.0
    """The trial's CPUs: torch threads and a file dataset's decoding workers."""
    backbone: str | None = None
    """Stage 2: the backbone of the stage-1 variant it runs on (stage 1: its config's)."""
    stage1_dir: str | None = None
    """Stage 2: the selected stage-1 trial's folder (None while the experiment has not opened)."""
    after: str | None = None
    """The experiment this trial's waits for (``stage1`` for stage 2, else None)."""
    store: str = ""
    """Where the trial keeps its checkpoints and weights (``study.store``): empty for the results folder
    itself, else the study's store URI (no secrets), and the trial writes nothing into the results folder."""
    adopt: str = ""
    """With a store apart from the results folder: the folder name of the orphaned trial this one
    continues (``study.search.resume``), whose files in the store it takes over."""

    KEY = CONTEXT_KEY

    @classmethod
    def of(cls, config: dict) -> TrialContext:
        """The context in a Tune trial's config."""
        return cls.from_dict(config.get(CONTEXT_KEY)) or cls()


@dataclass(frozen=True)
class FinalReport(_View):
    """``final/<stage>--<method>.json``: the selected configuration evaluated once per seed on the
    test set."""

    experiment: str = ""
    method: str = ""
    trial_id: str = ""
    trial_index: int = 0
    params: dict = field(default_factory=dict)
    objective: float | None = None
    split: str = "test"
    per_seed: dict = field(default_factory=dict)
    """str(seed) -> accuracy report (all, many, medium, few, per_class)."""

    def seed(self, seed: int) -> dict:
        return self.per_seed.get(str(seed)) or {}


@dataclass(frozen=True)
class MethodInfo:
    """A method of an experiment in study.yaml: its budget and its searched parameters."""

    budget: int = 1
    searched: tuple = ()


@dataclass(frozen=True)
class ExperimentInfo:
    """An experiment (one Tune experiment, one stage) in study.yaml."""

    name: str
    stage: str
    budget: int
    methods: dict
    """method -> :class:`MethodInfo`, in the order the space lists them. In stage 1 the methods are
    the stage-1 variants."""
    variant: str | None = None
    """Stage 2: the stage-1 variant whose selected backbone the methods run on."""

    def variant_of(self, method: str) -> str:
        """The variant a row of this experiment belongs to (stage 1: the method is the variant)."""
        return method if self.stage == "stage1" else (self.variant or "")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "stage": self.stage,
            "budget": self.budget,
            "variant": self.variant,
            "methods": {m: {"budget": i.budget, "searched": list(i.searched)} for m, i in self.methods.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> ExperimentInfo:
        methods = {
            m: MethodInfo(int((i or {}).get("budget", 1)), tuple((i or {}).get("searched") or ()))
            for m, i in (d.get("methods") or {}).items()
        }
        stage = str(d.get("stage") or d["name"])
        # studies written before variants: their single stage-2 experiment ran on `tuned`
        variant = d.get("variant") or ("tuned" if stage == "stage2" else None)
        return cls(str(d["name"]), stage, int(d.get("budget", 0)), methods, variant)


@dataclass(frozen=True)
class DataSummary(_View):
    """The data block of study.yaml: what the study trained and selected on."""

    dataset: str = ""
    imbalance_factor: float | None = None
    num_classes: int = 0
    train_counts: list = field(default_factory=list)
    many_threshold: int | None = None
    few_threshold: int | None = None
    selection_split: str = "val"
    subset_hash: str | None = None
    official_files: bool | None = None


@dataclass(frozen=True)
class StudyHeader:
    """``study.yaml``: what the study is (resolved space, experiments, data) and what produced it."""

    study: str
    fingerprint: str
    protocol: str
    space: dict
    """The resolved space (``StudySpace.to_dict``)."""
    experiments: tuple
    """:class:`ExperimentInfo` per Tune experiment, in the order they run."""
    data: DataSummary
    backbone: str = ""
    provenance: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    """The layout version that wrote the folder (:data:`FORMAT_VERSION`; 1 when study.yaml has none)."""

    @property
    def seeds(self) -> list[int]:
        return list(self.space.get("seeds") or [])

    def experiment(self, stage: str) -> ExperimentInfo | None:
        """The first experiment of a stage (``stage1``/``stage2``)."""
        return next((e for e in self.experiments if e.stage == stage), None)

    def stage2_experiments(self) -> list[ExperimentInfo]:
        """One per fed variant, in the order they ran."""
        return [e for e in self.experiments if e.stage == "stage2"]

    @property
    def variants(self) -> list[str]:
        """The stage-1 variants, in the order of the space."""
        s1 = self.experiment("stage1")
        return list(s1.methods) if s1 else []

    @property
    def fed_variants(self) -> list[str]:
        return [e.variant for e in self.stage2_experiments() if e.variant]

    def search_space(self, exp: ExperimentInfo, method: str) -> dict:
        """The searched parameters of ``method`` as written in the space (``{name: {loguniform: [..]}}``)."""
        s1 = self.space.get("stage1") or {}
        if exp.stage == "stage1":
            if "variants" in s1:
                return dict(((s1["variants"].get(method) or {}).get("search")) or {})
            return dict(s1.get("search") or {}) if method == "tuned" else {}  # written before variants
        return dict(((self.space.get("stage2") or {}).get(method) or {}).get("search") or {})

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "study": self.study,
            "fingerprint": self.fingerprint,
            "protocol": self.protocol,
            "space": self.space,
            "experiments": [e.to_dict() for e in self.experiments],
            "data": self.data.to_dict(),
            "backbone": self.backbone,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StudyHeader:
        return cls(
            study=str(d.get("study") or ""),
            fingerprint=str(d.get("fingerprint") or ""),
            protocol=str(d.get("protocol") or (d.get("space") or {}).get("protocol") or "honest"),
            space=dict(d.get("space") or {}),
            experiments=tuple(ExperimentInfo.from_dict(e) for e in d["experiments"]),
            data=DataSummary.from_dict(d.get("data") or {}),
            backbone=str(d.get("backbone") or ""),
            provenance=dict(d.get("provenance") or {}),
            format_version=int(d.get("format_version") or 1),
        )

    def write(self, path: str | os.PathLike) -> None:
        write_yaml(path, self.to_dict())


def read_yaml_file(path: str | os.PathLike) -> Any:
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    import yaml

    from study.fsutil import atomic_write_text, clean_json

    atomic_write_text(path, yaml.safe_dump(clean_json(obj), sort_keys=False, allow_unicode=True))


def load_header(root: str | os.PathLike) -> tuple[StudyPaths, StudyHeader]:
    """The study's paths and study.yaml; a clear error when ``root`` is not a study folder."""
    paths = StudyPaths(root)
    if not paths.root.is_dir():
        raise UserError(f"{root}: no such study folder (studies live in results/NAME)")
    if not paths.study_yaml.is_file():
        raise UserError(f"{root} is not a study folder (no study.yaml); pass a folder written by 'study run'")
    try:
        raw = read_yaml_file(paths.study_yaml)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{paths.study_yaml} is unreadable ({type(e).__name__}); the study folder is damaged") from None
    try:
        return paths, StudyHeader.from_dict(raw)
    except (TypeError, KeyError, ValueError, AttributeError):
        raise UserError(f"{paths.study_yaml} is not a study header; the study folder is damaged") from None


# --- rows of trials.csv and per_class.csv --------------------------------------------------------------------


@dataclass
class TrialRow:
    """One row of trials.csv: a stage, method, trial and seed. Accuracies are fractions in 0-1
    (``sel_*`` on the selection split — validation under the honest protocol, test under wb-parity —
    at the seed's selected epoch; ``test_*`` only for selected configurations). One ``param.<name>``
    column per searched parameter follows these."""

    study: str = ""
    """The study's name (its folder under the results directory)."""
    stage: str = ""
    """``stage1`` or ``stage2``."""
    experiment: str = ""
    """The Tune experiment: ``stage1``, or ``stage2-<variant>`` for the stage-2 methods on a variant."""
    variant: str = ""
    """The stage-1 variant: the trial's own (stage 1) or the one whose backbone it ran on (stage 2)."""
    method: str = ""
    """Stage 1: the variant; stage 2: the stage-2 method."""
    trial: int = 0
    """The trial's index within its experiment (from 0, in the order trials were proposed)."""
    trial_id: str = ""
    """Ray Tune's id of the trial (the suffix of its folder ``trials/<experiment>/trial-NNNN-<id>``)."""
    seed: int = 0
    """The seed of this row; every configuration is trained for every seed of the study."""
    status: str = ""
    """``completed``, ``diverged``, ``failed``, ``stopped`` (by ASHA), ``running``, ``interrupted`` or ``pending``."""
    reason: str | None = None
    """Why a trial diverged or failed (the exception's message)."""
    selected: bool = False
    """True for the configuration selected for its method (the one evaluated on the test set)."""
    objective: float | None = None
    """What the search maximised: the mean over seeds of ``sel_all``."""
    best_epoch: int | None = None
    """The epoch selected for this seed on the selection split."""
    epochs_run: int | None = None
    """Epochs the trial ran (fewer than configured when ASHA stopped it or it diverged)."""
    resumed_from_epoch: int | None = None
    """The checkpointed epoch the trial last continued from (0: it never resumed)."""
    selection_split: str | None = None
    """The split that selected epochs and hyperparameters: ``val``, or ``test`` under wb-parity/test-selection."""
    sel_all: float | None = None
    """Selection-split accuracy over all classes at ``best_epoch``."""
    sel_many: float | None = None
    """The same over the Many-shot classes."""
    sel_medium: float | None = None
    """The same over the Medium-shot classes."""
    sel_few: float | None = None
    """The same over the Few-shot classes."""
    test_all: float | None = None
    """Test accuracy over all classes (selected configurations only)."""
    test_many: float | None = None
    """Test accuracy over the Many-shot classes."""
    test_medium: float | None = None
    """Test accuracy over the Medium-shot classes."""
    test_few: float | None = None
    """Test accuracy over the Few-shot classes."""
    norm_ratio: float | None = None
    """Largest over smallest per-class classifier weight norm."""
    norm_cv: float | None = None
    """Coefficient of variation of the per-class weight norms."""
    norm_spearman: float | None = None
    """Spearman rho between the per-class weight norm and the class's training count."""
    maxnorm_radius: float | None = None
    """The MaxNorm radius the projection used (methods with MaxNorm only)."""
    maxnorm_binding: float | None = None
    """Fraction of the MaxNorm projections that clipped at least one row."""
    maxnorm_rows_clipped: float | None = None
    """Mean number of rows clipped per projection."""
    tau: float | None = None
    """The τ a post-hoc method (τ-norm, logit adjustment) selected on the selection split."""
    fdr_train: float | None = None
    """Fisher discriminant ratio tr(S_B)/tr(S_W) of the penultimate features on the training split
    (``study.training.geometry``; selected configurations only, like every geometry column)."""
    fdr_test: float | None = None
    """The same on the test split."""
    class_cos_train: float | None = None
    """Mean pairwise cosine of the class-mean features (training split)."""
    class_cos_test: float | None = None
    """The same on the test split."""
    class_cos_centred_test: float | None = None
    """The same for class means minus the global mean (test split)."""
    cone_cos_test: float | None = None
    """Mean cosine of every feature to the global mean feature (test split): the cone effect."""
    feature_norm_spearman: float | None = None
    """Spearman rho between the mean feature norm per class (training split) and the class count."""
    notes: str | None = None
    """What happened on the way: a checkpoint found unusable, an adopted orphan trial, ..."""
    params: dict = field(default_factory=dict)
    """Written as ``param.<name>`` columns."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        params = d.pop("params")
        return {**d, **{f"param.{k}": v for k, v in params.items()}}


@dataclass
class PerClassRow:
    """One row of per_class.csv: one class of a selected configuration and seed."""

    study: str = ""
    """The study's name."""
    stage: str = ""
    """``stage1`` or ``stage2``."""
    experiment: str = ""
    """``stage1`` or ``stage2-<variant>``."""
    variant: str = ""
    """The stage-1 variant (its own, or the one the stage-2 method ran on)."""
    method: str = ""
    """Stage 1: the variant; stage 2: the method."""
    seed: int = 0
    """The seed."""
    # `class` is a keyword: the field is ``klass``, the column ``class``
    klass: int = 0
    """The class index."""
    train_count: int = 0
    """The class's number of training images in the long-tailed subset."""
    group: str = ""
    """``many``, ``medium`` or ``few``."""
    sel_acc: float | None = None
    """Selection-split accuracy of the class (0-1)."""
    test_acc: float | None = None
    """Test accuracy of the class (0-1)."""
    weight_norm: float | None = None
    """Norm of the class's classifier row."""
    feature_norm: float | None = None
    """Mean norm of the class's training features (selected configurations, from the final evaluation)."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["class"] = d.pop("klass")
        return {k: d[k] for k in PER_CLASS_COLUMNS}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of the dataclass ``cls`` (read from its source, as Sphinx
    does), on one line each; "" for a field without one."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            text = ""
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                text = " ".join(nxt.value.value.split())
            docs[stmt.target.id] = text
    return docs


def trials_csv_columns() -> list[tuple[str, str]]:
    """(column, description) for every fixed column of trials.csv, in file order."""
    docs = field_docs(TrialRow)
    return [(c, docs[c]) for c in TRIALS_COLUMNS]


def per_class_csv_columns() -> list[tuple[str, str]]:
    """(column, description) for every column of per_class.csv, in file order."""
    docs = field_docs(PerClassRow)
    return [(c, docs["klass" if c == "class" else c]) for c in PER_CLASS_COLUMNS]


TRIALS_COLUMNS = [f.name for f in dataclasses.fields(TrialRow) if f.name != "params"]
"""trials.csv columns (:class:`TrialRow`), followed by one ``param.<name>`` column per searched parameter."""

PER_CLASS_COLUMNS = [("class" if f.name == "klass" else f.name) for f in dataclasses.fields(PerClassRow)]
"""per_class.csv columns (:class:`PerClassRow`)."""

NUMERIC_COLUMNS = {
    "trial",
    "seed",
    "objective",
    "best_epoch",
    "epochs_run",
    "resumed_from_epoch",
    "sel_all",
    "sel_many",
    "sel_medium",
    "sel_few",
    "test_all",
    "test_many",
    "test_medium",
    "test_few",
    "norm_ratio",
    "norm_cv",
    "norm_spearman",
    "maxnorm_radius",
    "maxnorm_binding",
    "maxnorm_rows_clipped",
    "tau",
    "fdr_train",
    "fdr_test",
    "class_cos_train",
    "class_cos_test",
    "class_cos_centred_test",
    "cone_cos_test",
    "feature_norm_spearman",
    "feature_norm",
    "class",
    "train_count",
    "sel_acc",
    "test_acc",
    "weight_norm",
}
"""Columns of both CSVs that hold numbers (read back with fixed dtypes)."""
