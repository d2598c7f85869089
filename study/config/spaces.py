"""Search-space files: YAML data, validated against the config dataclasses.

A space file says which dataset and protocol, which seeds, and per stage the fixed values, the
searched parameters with their distributions, and the trial budget::

    dataset: cifar100-lt
    protocol: honest            # honest | wb-parity
    seeds: 3                    # or a list: [0, 1, 2]
    data: {imbalance_factor: 100}
    stage1:
      backbone: resnet32        # values shared by every variant
      epochs: 200
      variants:                 # named stage-1 configurations, each fixed or searched, own budget
        ce:     {weight_decay: 0}
        ce-wd:  {weight_decay: {loguniform: [1.0e-4, 2.0e-2], default: 5.0e-3}, budget: 16}
        cb-sampler: {sampler: class-balanced, weight_decay: 5.0e-4}
      feeds_stage2: [ce, ce-wd] # the selected variants stage 2 runs on (default: all)
    stage2:
      epochs: 10                # values shared by every method
      methods:
        wb:
          weight_decay: {loguniform: [1.0e-3, 1.0]}
          maxnorm_threshold: {uniform: [0.0, 1.0]}
          budget: 16
        tau-norm: {}

The older form of ``stage1`` (study 0.1: searched fields directly under it, plus ``budget`` and
``baseline``) is refused with one line that spells out its rewrite into ``variants``.

A value is either fixed (``epochs: 10``) or a distribution: ``{loguniform: [lo, hi]}``,
``{uniform: [lo, hi]}``, ``{int: [lo, hi]}`` or ``{choice: [a, b, ...]}``, with an optional
``default`` (what ``study train`` uses). Every fixed value and both ends of every range are checked
by building the dataclass, so ``maxnorm_threshold: {uniform: [0, 1.5]}`` fails before any trial.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from study.config.backbones import MODEL_NAMES as MODELS
from study.config.backbones import feature_dim
from study.config.datasets import DATASETS
from study.config.methods import METHODS
from study.config.plugins import PLUGINS_KEY, Plugin, load_plugins
from study.config.schema import (
    PROTOCOL_PRESETS,
    PROTOCOLS,
    DataConfig,
    EvalConfig,
    Stage1Config,
    Stage2Config,
    build,
    check_protocol,
    coerce,
    field_types,
    to_dict,
)
from study.errors import ConfigError, UserError, nearest, unknown

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"

TOP_KEYS = {
    "description": "free text",
    "dataset": "",
    "protocol": "",
    "seeds": "",
    "data": "",
    "eval": "",
    "search": "",
    "stage1": "",
    "stage2": "",
    "plugins": "",
}
STAGE1_KEYS = {"variants", "feeds_stage2"}
OLD_FORM_KEYS = {"budget", "baseline", "scheduler"}
"""Keys of the older ``stage1`` form (searched fields directly under ``stage1``), refused with
their rewrite."""
VARIANT_KEYS = {"budget", "scheduler"}
VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.+]*(-[a-z0-9_.+]+)*$")
ADDED_FIELDS = {
    "focal_gamma": 1.0,
    "ldam_max_m": 0.5,
    "ldam_s": 30.0,
    "la_tau": 1.0,
    "drw_epoch": None,
    "cosine_scale": 30.0,
    "lr_milestones": (),
    "lr_decay": 0.1,
}
"""Configuration fields added after 0.2.0, with their defaults: left out of the fingerprint while
at the default (see :meth:`StudySpace.fingerprint`)."""
STAGE2_KEYS = {"methods", "train_method"}
METHOD_KEYS = {"budget", "scheduler"}
SEARCH_KEYS = {"sampler_seed", "startup_trials", "retries", "max_concurrent"}
DIST_KINDS = ("loguniform", "uniform", "int", "choice")


@dataclass(frozen=True)
class Dist:
    """A searched parameter's distribution."""

    kind: str
    low: Any = None
    high: Any = None
    choices: tuple = ()
    default: Any = None

    def to_optuna(self):
        import optuna.distributions as od

        if self.kind == "loguniform":
            return od.FloatDistribution(float(self.low), float(self.high), log=True)
        if self.kind == "uniform":
            return od.FloatDistribution(float(self.low), float(self.high))
        if self.kind == "int":
            return od.IntDistribution(int(self.low), int(self.high))
        return od.CategoricalDistribution(list(self.choices))

    @property
    def log(self) -> bool:
        return self.kind == "loguniform"

    def to_yaml(self) -> dict:
        d: dict[str, Any] = {self.kind: list(self.choices) if self.kind == "choice" else [self.low, self.high]}
        if self.default is not None:
            d["default"] = self.default
        return d


@dataclass(frozen=True)
class Scheduler:
    """Optional early stopping of poor trials (ASHA, on the per-epoch objective)."""

    kind: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class SearchSettings:
    sampler_seed: int = 0
    """Seed of Optuna's TPE sampler (the same seed and completion order give the same trials)."""
    startup_trials: int = 10
    """Random trials before TPE starts modelling (Optuna's default 10)."""
    retries: int = 1
    """A trial that raises is re-run from its last checkpoint this many times, then recorded failed."""
    max_concurrent: int | None = None
    """At most this many trials of a stage at once (None: as many as the resources allow)."""


@dataclass(frozen=True)
class MethodPlan:
    """What a stage runs for one method: its base config, searched parameters and budget."""

    method: str
    config: Any
    """Stage1Config / Stage2Config with searched parameters at their defaults."""
    params: dict[str, Dist]
    budget: int
    scheduler: Scheduler | None = None


@dataclass(frozen=True)
class Experiment:
    """One experiment of the search, with one Optuna study and budget per method.

    ``stage1`` has one method per stage-1 variant; each fed variant has a stage-2 experiment
    (``stage2-<variant>``; ``stage2`` in an old-form space) with one method per entry of
    ``stage2.methods``. All trials of every experiment run in one Tuner, so methods share workers (and
    a GPU) instead of waiting for each other."""

    name: str
    stage: str
    plans: tuple[MethodPlan, ...]
    variant: str | None = None
    """Stage 2: the stage-1 variant whose selected backbone the methods run on."""

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(p.method for p in self.plans)

    @property
    def budget(self) -> int:
        return sum(p.budget for p in self.plans)

    def plan(self, method: str) -> MethodPlan:
        return next(p for p in self.plans if p.method == method)


@dataclass(frozen=True)
class StudySpace:
    """A validated search space: everything ``study run`` and ``study train`` need."""

    name: str
    source: str
    protocol: str
    seeds: tuple[int, ...]
    data: DataConfig
    eval: EvalConfig
    search: SearchSettings
    variants: dict[str, MethodPlan]
    """Stage-1 variants by name, in the order of the space file."""
    feeds_stage2: tuple[str, ...]
    """The variants whose selected models stage 2 runs on."""
    stage2: dict[str, Stage2Config]
    stage2_params: dict[str, dict[str, Dist]]
    stage2_budget: dict[str, int]
    stage2_scheduler: dict[str, Scheduler | None]
    train_method: str
    description: str = ""
    plugins: tuple[Plugin, ...] = ()
    """The plug-ins the space imports (``plugins:``), in order."""

    # -- derived
    @property
    def train_variant(self) -> str:
        """The variant ``study train`` runs by default: the first that feeds stage 2."""
        return self.feeds_stage2[0]

    @property
    def stage1(self) -> Stage1Config:
        """The stage-1 configuration of :attr:`train_variant`."""
        return self.variants[self.train_variant].config

    def stage2_experiment_name(self, variant: str) -> str:
        """The stage-2 experiment trained on ``variant``'s selected backbone."""
        return f"stage2-{variant}"

    def experiments(self) -> list[Experiment]:
        """The study's Tune experiments, in the order they run: stage 1 (every variant), then one
        stage-2 experiment per fed variant."""
        s2 = tuple(
            MethodPlan(m, self.stage2[m], self.stage2_params[m], self.stage2_budget[m], self.stage2_scheduler[m])
            for m in self.stage2
        )
        return [Experiment("stage1", "stage1", tuple(self.variants.values()))] + [
            Experiment(self.stage2_experiment_name(v), "stage2", s2, variant=v) for v in self.feeds_stage2
        ]

    def backbone_of(self, variant: str) -> str:
        return self.variants[variant].config.backbone

    def to_dict(self) -> dict:
        """The resolved space as plain data (written to study.yaml; its hash identifies the study)."""

        def params(p: dict[str, Dist]) -> dict:
            return {k: v.to_yaml() for k, v in p.items()}

        def sched(s: Scheduler | None) -> dict | None:
            return (
                None
                if s is None
                else {s.kind: {"grace_period": s.grace_period, "reduction_factor": s.reduction_factor}}
            )

        return {
            "space": self.name,
            "protocol": self.protocol,
            "seeds": list(self.seeds),
            "data": to_dict(self.data),
            "eval": to_dict(self.eval),
            "search": to_dict(self.search),
            "stage1": {
                "variants": {
                    v: {
                        "config": to_dict(p.config),
                        "search": params(p.params),
                        "budget": p.budget,
                        "scheduler": sched(p.scheduler),
                    }
                    for v, p in self.variants.items()
                },
                "feeds_stage2": list(self.feeds_stage2),
                # kept, always False, so the fingerprints of existing studies stay the same
                "legacy_form": False,
            },
            "stage2": {
                m: {
                    "config": to_dict(self.stage2[m]),
                    "search": params(self.stage2_params[m]),
                    "budget": self.stage2_budget[m],
                    "scheduler": sched(self.stage2_scheduler[m]),
                }
                for m in self.stage2
            },
            "train_method": self.train_method,
            # only when there are any, so the fingerprints of spaces without plug-ins stay the same
            **({"plugins": {p.spec: p.record() for p in self.plugins}} if self.plugins else {}),
        }

    def fingerprint(self) -> str:
        """The hash that identifies the study (a changed space is refused on resume). Fields added
        to the configuration after a study was started count only when set away from their default,
        so the fingerprints of existing studies stay what they were."""
        d = copy.deepcopy(self.to_dict())
        configs = [v["config"] for v in d["stage1"]["variants"].values()] + [m["config"] for m in d["stage2"].values()]
        for cfg in configs:
            for key, default in ADDED_FIELDS.items():
                if key in cfg and cfg[key] == default:
                    del cfg[key]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- locating and reading files -------------------------------------------------------------------------


def available_spaces() -> list[str]:
    """The names of the spaces shipped with the package (``study run NAME``), sorted."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def space_summary(name: str) -> str:
    """The ``description`` of a shipped space, on one line ("" when it has none)."""
    try:
        raw = read_yaml(SPACES_DIR / f"{name}.yaml")
    except UserError:
        return ""
    return " ".join(str(raw.get("description") or "").split())


def resolve_space_path(space: str) -> Path:
    """A space name in ``search_spaces/`` or a path to a YAML file."""
    p = Path(space)
    if p.suffix in (".yaml", ".yml") or os.sep in space or p.exists():
        if not p.is_file():
            raise UserError(f"search-space file {space} not found")
        return p
    cand = SPACES_DIR / f"{space}.yaml"
    if cand.is_file():
        return cand
    names = available_spaces()
    guess = nearest(space, names)
    hint = f" (did you mean '{guess}'?)" if guess else ""
    raise UserError(
        f"unknown search space '{space}'{hint}; available: {', '.join(names)} (or pass a path to a .yaml file)"
    )


def _unique_key_loader():
    """PyYAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the last
    one silently, so a duplicated ``dataset:`` would change the study without a word)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    break
                if first is not None:
                    raise DuplicateKey(key, first + 1, key_node.start_mark.line + 1)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


class DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int):
        super().__init__(f"key '{key}' is written twice (lines {first} and {second}); keep one")


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not a UTF-8 text file (byte {e.start} is 0x{e.object[e.start]:02x}); "
            "pass a YAML search-space file such as study/search_spaces/digits-lt.yaml"
        ) from None
    try:
        # safe loader: no arbitrary Python objects from a space file
        raw = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506
    except DuplicateKey as e:
        raise UserError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if raw is None:
        raise UserError(f"{path}: the file is empty; start from one of study/search_spaces/*.yaml")
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: expected a mapping of keys (dataset, protocol, seeds, stage1, stage2, ...), "
            f"got a {type(raw).__name__}"
        )
    return raw


# --- --set KEY=VALUE --------------------------------------------------------------------------------------


def _check_set_path(parts: list[str]) -> None:
    """Raise ConfigError if a dotted --set key cannot exist in a space file."""
    top = parts[0]
    if top not in TOP_KEYS:
        raise ConfigError(top, unknown("key", top, TOP_KEYS))
    if len(parts) == 1:
        return
    sub = parts[1]
    if top == "data":
        _known(sub, field_types(DataConfig), "data")
    elif top == "eval":
        _known(sub, field_types(EvalConfig), "eval")
    elif top == "search":
        _known(sub, SEARCH_KEYS, "search")
    elif top == "stage1":
        _known(sub, set(field_types(Stage1Config)) | STAGE1_KEYS, "stage1")
        if sub == "variants" and len(parts) >= 4:
            _known(parts[3], set(field_types(Stage1Config)) | VARIANT_KEYS, f"stage1.variants.{parts[2]}")
    elif top == "stage2":
        if sub == "methods":
            if len(parts) >= 3:
                _known(parts[2], METHODS, "stage2.methods", kind="stage-2 method")
            if len(parts) >= 4:
                _known(
                    parts[3], set(field_types(Stage2Config)) - {"method"} | METHOD_KEYS, f"stage2.methods.{parts[2]}"
                )
        else:
            _known(sub, set(field_types(Stage2Config)) - {"method"} | STAGE2_KEYS, "stage2")
    elif len(parts) > 1:
        raise ConfigError(".".join(parts), f"'{top}' has no sub-keys")


def _known(key: str, valid, where: str, kind: str = "key") -> None:
    if key not in valid:
        raise ConfigError(f"{where}.{key}", unknown(kind, key, valid))


def apply_sets(raw: dict, sets: list[str]) -> dict:
    """Apply ``--set a.b.c=value`` overrides (values parsed as YAML) to a raw space mapping."""
    import yaml

    raw = copy.deepcopy(raw)
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set stage1.epochs=3")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise UserError(f"--set {item}: cannot parse the value '{text}'") from None
        parts = [p for p in key.split(".") if p]
        if not parts:
            raise UserError(f"--set {item}: empty key")
        try:
            _check_set_path(parts)
        except ConfigError as e:
            raise UserError(f"--set {item}: {e}") from None
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return raw


# --- validation -------------------------------------------------------------------------------------------


def _parse_dist(key: str, spec: dict, tp: Any) -> Dist:
    kinds = [k for k in spec if k in DIST_KINDS]
    extra = [k for k in spec if k not in DIST_KINDS and k != "default"]
    if len(kinds) != 1 or extra:
        bad = extra[0] if extra else None
        if bad is not None:
            raise ConfigError(
                key,
                f"unknown distribution '{bad}'"
                + (f" (did you mean '{nearest(bad, DIST_KINDS)}'?)" if nearest(bad, DIST_KINDS) else "")
                + f"; use one of: {', '.join(DIST_KINDS)} (e.g. {{loguniform: [1.0e-4, 1.0e-2]}})",
            )
        raise ConfigError(key, f"a distribution needs exactly one of: {', '.join(DIST_KINDS)}")
    kind = kinds[0]
    arg = spec[kind]
    default = spec.get("default")
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(key, "choice needs a non-empty list, e.g. {choice: [0.01, 0.1]}")
        choices = tuple(coerce(key, v, tp) for v in arg)
        if default is not None:
            default = coerce(key, default, tp)
        return Dist("choice", choices=choices, default=default)
    if not isinstance(arg, list) or len(arg) != 2:
        raise ConfigError(key, f"{kind} needs [low, high], e.g. {{{kind}: [1.0e-4, 1.0e-2]}}")
    base = typing_base(tp)
    if base not in (int, float):
        raise ConfigError(key, f"{kind} ranges need a numeric parameter; use {{choice: [...]}}")
    num = int if kind == "int" else float
    lo, hi = (coerce(key, v, num) for v in arg)
    if not lo < hi:
        raise ConfigError(key, f"range [{lo:g}, {hi:g}] is inverted or empty; low must be below high")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(key, f"loguniform needs low > 0, got {lo:g} (use uniform for ranges that include 0)")
    if default is not None:
        default = coerce(key, default, num)
        if not lo <= default <= hi:
            raise ConfigError(key, f"default {default:g} is outside [{lo:g}, {hi:g}]")
    return Dist(kind, lo, hi, default=default)


def dist_from_yaml(d: dict) -> Dist:
    """Inverse of ``Dist.to_yaml`` (for reading study.yaml)."""
    kind = next(k for k in d if k in DIST_KINDS)
    if kind == "choice":
        return Dist("choice", choices=tuple(d[kind]), default=d.get("default"))
    return Dist(kind, d[kind][0], d[kind][1], default=d.get("default"))


def typing_base(tp: Any) -> Any:
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _split_values(
    section: dict,
    cls: type,
    special: set[str],
    where: str,
    allow_search: bool = True,
    forbid: set[str] = frozenset(),
    search_home: str = "stage2.methods.<method>",
) -> tuple[dict, dict[str, Dist], dict]:
    """Split a stage mapping into fixed values, distributions and special keys (budget, ...)."""
    types = field_types(cls)
    fixed, params, extra = {}, {}, {}
    for key, value in section.items():
        if key in special:
            extra[key] = value
            continue
        if key not in types or key in forbid:
            valid = (set(types) - set(forbid)) | special
            raise ConfigError(f"{where}.{key}", unknown("key", key, valid))
        if isinstance(value, dict):
            if not allow_search:
                raise ConfigError(
                    f"{where}.{key}", f"search distributions go under {search_home}, not in the values they all share"
                )
            params[key] = _parse_dist(f"{where}.{key}", value, types[key])
        else:
            fixed[key] = value
    return fixed, params, extra


def _budget(value: Any, key: str, searched: bool) -> int:
    if value is None:
        if searched:
            raise ConfigError(key, "missing; say how many configurations to try (e.g. budget: 16)")
        return 1
    b = coerce(key, value, int)
    if b <= 0:
        raise ConfigError(key, f"{b} must be at least 1 (the number of configurations to try)")
    if not searched and b != 1:
        raise ConfigError(
            key, f"{b} configurations requested but nothing is searched here; add a distribution or set budget: 1"
        )
    return b


def _scheduler(value: Any, key: str, epochs: int) -> Scheduler | None:
    if value in (None, "none", False):
        return None
    if not isinstance(value, dict) or list(value) != ["asha"]:
        raise ConfigError(key, "expected null or {asha: {grace_period: N, reduction_factor: F}}")
    body = value["asha"] or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{key}.asha", "expected a mapping {grace_period: N, reduction_factor: F}")
    for k in body:
        if k not in ("grace_period", "reduction_factor"):
            raise ConfigError(f"{key}.asha.{k}", unknown("key", k, ("grace_period", "reduction_factor")))
    g = coerce(f"{key}.asha.grace_period", body.get("grace_period", 1), int)
    r = coerce(f"{key}.asha.reduction_factor", body.get("reduction_factor", 2), float)
    if not 1 <= g <= epochs:
        raise ConfigError(f"{key}.asha.grace_period", f"{g} must be between 1 and the number of epochs ({epochs})")
    if r <= 1:
        raise ConfigError(f"{key}.asha.reduction_factor", f"{r:g} must be greater than 1")
    return Scheduler("asha", g, r)


def _check_searchable(cls: type, fixed: dict, params: dict[str, Dist], where: str) -> Any:
    """Build the base config and one config per range end / choice, so bad bounds fail now."""
    base_values = dict(fixed)
    for k, d in params.items():
        if d.default is not None:
            base_values[k] = d.default
    base = build(cls, base_values, where)
    for k, d in params.items():
        ends = d.choices if d.kind == "choice" else (d.low, d.high)
        for v in ends:
            build(cls, {**base_values, k: v}, where)
    return base


def _presets(protocol: str, section: str) -> dict:
    return {k.split(".", 1)[1]: v for k, v in PROTOCOL_PRESETS[protocol].items() if k.startswith(section + ".")}


def _old_form_rewrite(s1: dict) -> str:
    """The ``stage1`` section of the older form rewritten with ``variants``, as one line of YAML:
    ``baseline`` (default true) was the variant ``naive`` (weight decay 0), the searched fields with
    ``budget`` and ``scheduler`` the variant ``tuned``, which alone fed stage 2. Keeping those names
    keeps the stage-1 rows of the tables as they were."""
    import yaml

    shared, tuned = {}, {}
    for k, v in s1.items():
        if k in ("budget", "scheduler") or (isinstance(v, dict) and set(v) & set(DIST_KINDS)):
            tuned[k] = v
        elif k != "baseline":
            shared[k] = v
    variants = {"tuned": tuned}
    if s1.get("baseline", True) is not False:
        variants = {"naive": {"weight_decay": 0}, **variants}
    new = {**shared, "variants": variants, "feeds_stage2": ["tuned"]}
    return yaml.safe_dump({"stage1": new}, default_flow_style=True, sort_keys=False, width=10**6).strip()


def _parse_stage1(s1: dict, protocol: str) -> tuple[dict[str, MethodPlan], tuple[str, ...]]:
    """(variants, fed variants) of the ``stage1`` section."""
    presets = _presets(protocol, "stage1")
    old = sorted(OLD_FORM_KEYS & set(s1))
    if "variants" not in s1:
        raise ConfigError(
            "stage1",
            "searched fields directly under stage1 (with budget/baseline) are the older form, no longer "
            f"read; write it with variants, e.g. {_old_form_rewrite(s1)}",
        )
    for key in old:
        raise ConfigError(
            f"stage1.{key}",
            "with stage1.variants, give each variant its own "
            f"{'budget and scheduler' if key != 'baseline' else 'entry (e.g. ce: {weight_decay: 0})'}",
        )
    shared, _, extra = _split_values(
        s1,
        Stage1Config,
        {"variants", "feeds_stage2"},
        "stage1",
        allow_search=False,
        search_home="stage1.variants.<variant>",
    )
    shared = {**presets, **shared}
    build(Stage1Config, shared, "stage1")  # the shared values alone must be valid, so errors name stage1.<key>
    body = extra["variants"]
    if not isinstance(body, dict) or not body:
        raise ConfigError(
            "stage1.variants",
            "expected a mapping of variant name -> settings, e.g. "
            "{ce: {weight_decay: 0}, ce-wd: {weight_decay: {loguniform: [1.0e-4, 2.0e-2]}, budget: 8}}",
        )
    variants: dict[str, MethodPlan] = {}
    for v, settings in body.items():
        where = f"stage1.variants.{v}"
        if not isinstance(v, str) or not VARIANT_NAME.match(v):
            raise ConfigError(
                where,
                "a variant name uses lower-case letters, digits, '.', '_', '+' and single "
                "'-' (e.g. ce-wd), and starts with a letter or digit",
            )
        settings = settings or {}
        if not isinstance(settings, dict):
            raise ConfigError(where, "expected a mapping of stage-1 fields (or {} for the shared values)")
        fixed, params, vextra = _split_values(settings, Stage1Config, VARIANT_KEYS, where)
        cfg = _check_searchable(Stage1Config, {**shared, **fixed}, params, where)
        variants[v] = MethodPlan(
            v,
            cfg,
            params,
            _budget(vextra.get("budget"), f"{where}.budget", bool(params)),
            _scheduler(vextra.get("scheduler"), f"{where}.scheduler", cfg.epochs),
        )
    feeds_raw = extra.get("feeds_stage2")
    if feeds_raw is None:
        feeds = tuple(variants)
    else:
        if isinstance(feeds_raw, str):
            feeds_raw = [feeds_raw]
        if not isinstance(feeds_raw, list) or not feeds_raw:
            raise ConfigError("stage1.feeds_stage2", f"expected a list of variant names, e.g. [{next(iter(variants))}]")
        for f in feeds_raw:
            if f not in variants:
                raise ConfigError("stage1.feeds_stage2", unknown("variant", str(f), variants))
        if len(set(feeds_raw)) != len(feeds_raw):
            raise ConfigError("stage1.feeds_stage2", "names a variant twice")
        feeds = tuple(feeds_raw)
    return variants, feeds


def _check_etf(cfg: Stage1Config, data: DataConfig, where: str) -> None:
    """An ETF classifier for C classes needs features of at least C - 1 dimensions: say so before
    anything runs, with the backbones that would do."""
    if cfg.classifier != "etf":
        return

    spec = DATASETS[data.dataset]
    need = spec.num_classes - 1

    def dim(name: str) -> int:
        return feature_dim(name)

    have = dim(cfg.backbone)
    if have < need:
        # digits-cnn is sized for 8x8 digits: not a suggestion for real images
        wide = [
            f"{m} ({d})" for m in MODELS if (m != "digits-cnn" or data.dataset == "digits-lt") and (d := dim(m)) >= need
        ]
        raise ConfigError(
            f"{where}.classifier",
            f"etf needs a feature dimension of at least {need} for "
            f"{data.dataset}'s {spec.num_classes} classes, but {cfg.backbone} gives {have}; use "
            + (" or ".join(wide) if wide else "a wider backbone")
            + " as the backbone",
        )


def parse_space(raw: dict, name: str = "space", source: str = "") -> StudySpace:
    """Validate a raw space mapping; ConfigErrors carry the offending key."""
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(key, unknown("key", key, TOP_KEYS))
    # first: the names the plug-ins register must be known when the rest is validated
    plugins = tuple(load_plugins(raw.get(PLUGINS_KEY), Path(source).parent if source else None))
    protocol = coerce("protocol", raw.get("protocol", "honest"), str)
    if protocol not in PROTOCOLS:
        raise ConfigError("protocol", unknown("protocol", protocol, PROTOCOLS))
    if "dataset" not in raw:
        raise ConfigError("dataset", f"missing; name a dataset ({', '.join(DATASETS)})")

    def section(key: str) -> dict:
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return value

    data_raw = {**_presets(protocol, "data"), **section("data"), "dataset": raw["dataset"]}
    data = build(DataConfig, data_raw, "data")
    if data.dataset != raw["dataset"]:
        raise ConfigError("data.dataset", "set the dataset at the top level only")
    check_protocol(protocol, data)
    eval_cfg = build(EvalConfig, {**_presets(protocol, "eval"), **section("eval")}, "eval")
    search_raw = section("search")
    for k in search_raw:
        if k not in SEARCH_KEYS:
            raise ConfigError(f"search.{k}", unknown("key", k, SEARCH_KEYS))
    search = build(SearchSettings, search_raw, "search")
    if search.startup_trials < 0:
        raise ConfigError("search.startup_trials", "must be >= 0")
    if search.retries < 0:
        raise ConfigError("search.retries", "must be >= 0")
    if search.max_concurrent is not None and search.max_concurrent < 1:
        raise ConfigError("search.max_concurrent", "must be at least 1 (or null)")

    seeds_raw = raw.get("seeds", 1)
    if isinstance(seeds_raw, list):
        seeds = tuple(coerce("seeds", s, int) for s in seeds_raw)
    else:
        k = coerce("seeds", seeds_raw, int)
        if k < 1:
            raise ConfigError("seeds", f"{k} seeds requested; use at least 1 (or a list like [0, 1, 2])")
        seeds = tuple(range(k))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", "needs at least one seed and no repeats")

    # stage 1
    variants, feeds = _parse_stage1(section("stage1"), protocol)
    for v, plan in variants.items():
        _check_etf(plan.config, data, f"stage1.variants.{v}")

    # stage 2
    s2 = section("stage2")
    common, _, s2_extra = _split_values(s2, Stage2Config, STAGE2_KEYS, "stage2", allow_search=False, forbid={"method"})
    # the shared values alone must be valid, so their errors name stage2.<key>
    build(Stage2Config, {**_presets(protocol, "stage2"), **common, "method": "none"}, "stage2")
    methods_raw = s2_extra.get("methods") or {"wb": {}}
    if not isinstance(methods_raw, dict):
        raise ConfigError("stage2.methods", "expected a mapping of method name -> settings")
    stage2, params2, budget2, sched2 = {}, {}, {}, {}
    for m, body in methods_raw.items():
        where = f"stage2.methods.{m}"
        if m not in METHODS:
            raise ConfigError(where, unknown("stage-2 method", str(m), METHODS))
        body = body or {}
        if not isinstance(body, dict):
            raise ConfigError(where, "expected a mapping of settings (or {} for the defaults)")
        fixed, params, extra = _split_values(body, Stage2Config, METHOD_KEYS, where, forbid={"method"})
        values = {**_presets(protocol, "stage2"), **common, **METHODS[m].preset, **fixed, "method": m}
        cfg = _check_searchable(Stage2Config, values, params, where)
        if METHODS[m].kind not in ("trained", "custom") and params and set(params) - {"tau"}:
            bad = sorted(set(params) - {"tau"})[0]
            raise ConfigError(
                f"{where}.{bad}",
                f"'{m}' does not train, so only tau can be searched "
                "(or leave tau unset to pick it on the selection split)",
            )
        if METHODS[m].head == "lws" and cfg.maxnorm:
            raise ConfigError(f"{where}.maxnorm", "LWS learns per-class scales; MaxNorm does not apply")
        stage2[m], params2[m] = cfg, params
        budget2[m] = _budget(extra.get("budget"), f"{where}.budget", bool(params))
        sched2[m] = _scheduler(extra.get("scheduler"), f"{where}.scheduler", cfg.epochs)
    train_method = coerce(
        "stage2.train_method", s2_extra.get("train_method", "wb" if "wb" in stage2 else next(iter(stage2))), str
    )
    if train_method not in stage2:
        raise ConfigError(
            "stage2.train_method", f"'{train_method}' is not among this space's methods: {', '.join(stage2)}"
        )
    return StudySpace(
        name=name,
        source=source,
        protocol=protocol,
        seeds=seeds,
        data=data,
        eval=eval_cfg,
        search=search,
        variants=variants,
        feeds_stage2=feeds,
        stage2=stage2,
        stage2_params=params2,
        stage2_budget=budget2,
        stage2_scheduler=sched2,
        train_method=train_method,
        description=str(raw.get("description", "")).strip(),
        plugins=plugins,
    )


def load_space(
    space: str, sets: list[str] | None = None, seeds: int | None = None, num_samples: int | None = None
) -> StudySpace:
    """Read, override and validate a space. Errors name the file and the key."""
    path = resolve_space_path(space)
    raw = read_yaml(path)
    raw = apply_sets(raw, sets or [])
    if seeds is not None:
        if seeds < 1:
            raise UserError(f"--seeds {seeds}: use at least 1")
        raw["seeds"] = seeds
    try:
        sp = parse_space(raw, name=path.stem, source=str(path))
    except ConfigError as e:
        raise UserError(f"{path}: {e}") from None
    if num_samples is not None:
        if num_samples < 1:
            raise UserError(f"--num-samples {num_samples}: use at least 1")
        sp = replace(
            sp,
            variants={v: replace(p, budget=num_samples if p.params else 1) for v, p in sp.variants.items()},
            stage2_budget={m: (num_samples if sp.stage2_params[m] else 1) for m in sp.stage2},
        )
    return sp


def _short(v: Any, n: int = 40) -> str:
    text = json.dumps(v, default=str, sort_keys=True) if isinstance(v, (dict, list)) else repr(v)
    return text if len(text) <= n else text[: n - 3] + "..."


def diff_dicts(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested mappings (``key: old -> new``), leaves first."""
    out: list[str] = []
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{p} added ({_short(new[k])})")
            elif k not in new:
                out.append(f"{p} removed (was {_short(old[k])})")
            else:
                out.extend(diff_dicts(old[k], new[k], p))
    elif old != new:
        out.append(f"{prefix}: {_short(old)} -> {_short(new)}")
    return out
