"""The components a space names — backbones, losses, stage-2 methods, datasets — by name.

Every name a space, ``--set`` or ``study train`` accepts is looked up in one of four registries.
The built-ins are registered through the same public functions a plug-in uses
(``study.register_backbone``, ``register_loss``, ``register_method``, ``register_dataset``), the way
Gymnasium registers its environments: the torch-free declaration (name, and what the configuration
must know without building anything, e.g. a backbone's feature dimension) with a target that is a
callable or a ``"module:attribute"`` string imported on first use. That keeps ``study table``,
``report`` and ``status`` free of torch while the names stay checkable everywhere.

The protocol each kind's target follows is in ``docs/plugins.md``; a plug-in module is imported by
``study.plugins.load_plugins`` before the space is read, so its names validate like the built-ins'.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from study.errors import UserError, unknown

T = TypeVar("T")

_registering_plugin: list[str] = []
"""The plug-in being imported (``study.plugins``), so each entry knows where it came from."""


def resolve(target: Any) -> Any:
    """A ``"module:attribute"`` string imported (dots in the attribute walk into it, and into a
    mapping's keys); anything else returned as it is."""
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = obj[part] if isinstance(obj, Mapping) else getattr(obj, part)
    return obj


class Registry(Mapping[str, T], Generic[T]):
    """Name -> registered object, in registration order; ``origin(name)`` says which plug-in (or
    ``builtin``) registered it. Unknown names raise a :class:`UserError` listing the valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}

    def add(self, name: str, obj: T, replace: bool = False) -> T:
        if not isinstance(name, str) or not name:
            raise UserError(f"a {self.kind} needs a non-empty name, got {name!r}")
        origin = _registering_plugin[-1] if _registering_plugin else "builtin"
        if name in self._items and not replace and self._origin[name] != origin:
            raise UserError(
                f"{self.kind} '{name}' is already registered by {self._origin[name]}; "
                f"{origin} must use another name (or replace=True to override it on purpose)"
            )
        self._items[name] = obj
        self._origin[name] = origin
        return obj

    def origin(self, name: str) -> str:
        return self._origin[name]

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(unknown(self.kind, name, self._items)) from None

    def get(self, name: str, default=None):  # Mapping.get expects a KeyError, not the UserError above
        return self._items.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._items)})"


# --- the four kinds -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """What is fixed about a dataset (its per-class sizes, statistics and the group thresholds)."""

    name: str
    num_classes: int
    train_per_class: int
    """Images per class in the balanced pool the long-tailed subset is drawn from."""
    test_per_class: int
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_imbalance_factor: float
    many_threshold: int
    few_threshold: int
    crop_padding: int
    flip: bool
    """Whether a horizontal flip preserves the class (not for digits)."""
    max_per_class: int | None = None
    """Cap on n_max (digits: keep n_max a round 100)."""
    needs_files: bool = True
    note: str = ""
    kind: str = "memory"
    """``memory``: images held as uint8 arrays and augmented on the device; ``files``: image files
    named by Kang et al.-format split lists, decoded and augmented in DataLoader workers
    (``study.data.filelists``, ``study.data.streaming``)."""
    color_jitter: bool = False
    """File datasets: Kang et al.'s ColorJitter(0.4, 0.4, 0.4, 0) in the training transform (not for
    iNaturalist)."""


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    """Row label in tables."""
    kind: str
    preset: dict[str, Any] = field(default_factory=dict)
    head: str = "linear"
    """Trained parameters: ``linear`` (weight and bias) or ``lws`` (per-class scales only)."""
    transform: str = ""
    """Post-hoc transform: ``tau-norm``, ``la-add`` or ``la-mul``."""
    description: str = ""
    fit: Any = None
    """``custom`` methods (plug-ins): ``fit(MethodInputs) -> (weight, bias)``, a callable or a
    ``"module:attribute"`` string (``study.config.registry.register_method``)."""

    @property
    def trains(self) -> bool:
        """A classifier (or LWS scales) is trained by SGD; the other kinds are closed-form functions
        of the stage-1 classifier and cached features (``study.training.posthoc``)."""
        return self.kind == "trained"


@dataclass(frozen=True)
class MethodInputs:
    """What a ``custom`` stage-2 method's ``fit`` receives (``study.register_method``). Tensors are
    float32 on the trial's device; the selection split is not given: the harness scores the head
    ``fit`` returns on it, as it does every method's."""

    weight: Any
    """The stage-1 classifier as a linear map of the features: C x D."""
    bias: Any
    """Its bias: C."""
    train_features: Any
    """The frozen backbone's features of the (unaugmented) training images: N x D."""
    train_labels: Any
    """Their labels: N (int64)."""
    counts: tuple[int, ...]
    """Training images per class (class 0 the largest)."""
    config: Any
    """The method's Stage2Config (its fixed and searched values: lr, weight_decay, tau, ...)."""
    seed: int
    """The trial's seed, for any randomness in ``fit``."""


@dataclass(frozen=True)
class BackboneEntry:
    """A backbone: ``make(num_classes, in_channels)`` returns either a whole
    ``study.training.models.LTClassifier`` or a feature extractor mapping an image batch
    (B, C, H, W) to (B, ``feature_dim``), which gets a linear classifier with bias."""

    name: str
    feature_dim: int
    make: Any
    description: str = ""


@dataclass(frozen=True)
class LossEntry:
    """A training loss: ``make(cfg, counts, device)`` returns ``fn(logits, y, weights)`` -> a scalar
    tensor; ``weights`` is None, or the per-class weights of deferred re-weighting from
    ``drw_epoch`` on. ``cfg`` is the stage's configuration, ``counts`` the training images per class."""

    name: str
    make: Any
    description: str = ""


@dataclass(frozen=True)
class DatasetEntry:
    """An in-memory dataset: ``load(data_dir, download)`` returns a
    ``study.data.sources.RawData`` (balanced train/test images, uint8 N x C x H x W, labels);
    ``spec`` the ``study.config.datasets.DatasetSpec`` the long-tailed subset is built with."""

    name: str
    spec: Any
    load: Any
    description: str = ""


METHOD_KINDS = ("identity", "trained", "posthoc", "ncm", "custom")

BACKBONES: Registry[BackboneEntry] = Registry("backbone")
LOSSES: Registry[LossEntry] = Registry("loss")
METHODS: Registry[Any] = Registry("stage-2 method")
"""Name -> ``study.config.methods.Method``."""
DATASETS: Registry[Any] = Registry("dataset")
"""Name -> ``study.config.datasets.DatasetSpec`` (the loaders are in :data:`DATASET_LOADERS`)."""
DATASET_LOADERS: dict[str, Any] = {}


def _decorator(register: Callable[[Any], Any], target: Any) -> Any:
    if target is not None:
        register(target)
        return target

    def wrap(fn):
        register(fn)
        return fn

    return wrap


def register_backbone(name: str, target: Any = None, *, feature_dim: int, description: str = "", replace=False):
    """Register a backbone ``name`` (used as ``stage1.backbone``). As a decorator of
    ``make(num_classes, in_channels) -> nn.Module``, or called with the target (a callable or a
    ``"module:attribute"`` string). ``feature_dim`` is the size of the feature the classifier sees."""
    if not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or feature_dim < 1:
        raise UserError(f"backbone '{name}': feature_dim must be a positive integer, got {feature_dim!r}")
    return _decorator(lambda t: BACKBONES.add(name, BackboneEntry(name, feature_dim, t, description), replace), target)


def register_loss(name: str, target: Any = None, *, description: str = "", replace=False):
    """Register a training loss ``name`` (``loss:`` of either stage). As a decorator of
    ``make(cfg, counts, device) -> fn(logits, y, weights)``, or called with the target."""
    return _decorator(lambda t: LOSSES.add(name, LossEntry(name, t, description), replace), target)


def register_method(
    name: str,
    target: Any = None,
    *,
    label: str | None = None,
    description: str = "",
    preset: Mapping[str, Any] | None = None,
    kind: str | None = None,
    head: str = "linear",
    transform: str = "",
    replace=False,
):
    """Register a stage-2 method ``name`` (a key of ``stage2.methods``).

    With a target — ``fit(inputs: study.MethodInputs) -> (weight C x D, bias C)`` — the method is
    a new procedure: the harness hands it the frozen stage-1 classifier, the training features and
    labels, and scores the head it returns on the selection split like every other method. Without
    one it is a preset of a built-in ``kind`` (``trained``: a classifier trained by SGD with the
    preset's Stage2Config values, e.g. ``{"loss": "balanced-softmax", "classifier_init": "reinit"}``,
    and ``head="lws"`` for per-class scales; ``posthoc`` with ``transform`` ``tau-norm``, ``la-add`` or
    ``la-mul``; ``identity``; ``ncm``).
    """

    def add(fit):
        k = kind or ("custom" if fit is not None else "trained")
        if k not in METHOD_KINDS:
            raise UserError(f"stage-2 method '{name}': kind {k!r} is not one of {', '.join(METHOD_KINDS)}")
        method = Method(name, label or name, k, dict(preset or {}), head, transform, description, fit)
        METHODS.add(name, method, replace)

    if target is None and kind is not None:
        add(None)
        return None
    return _decorator(add, target)


def register_dataset(
    name: str,
    target: Any = None,
    *,
    num_classes: int | None = None,
    shape: tuple[int, int, int] | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
    imbalance_factor: float = 100.0,
    crop_padding: int = 0,
    flip: bool = False,
    description: str = "",
    spec: Any = None,
    replace=False,
):
    """Register an in-memory dataset ``name`` (``dataset:``). As a decorator of
    ``load(data_dir, download) -> study.data.sources.RawData`` (the balanced official splits: every
    class ``train_per_class`` training and ``test_per_class`` test images), or called with the
    target. The long-tailed training subset, the validation split and the groups are built from it
    as for the built-in datasets; ``mean``/``std`` default to 0.5 per channel. ``spec`` (a
    ``study.config.datasets.DatasetSpec``) replaces the keyword fields; a spec of kind ``files``
    (split lists of image files) is registered without a loader."""
    if spec is None:
        missing = [
            k
            for k, v in [
                ("num_classes", num_classes),
                ("shape", shape),
                ("train_per_class", train_per_class),
                ("test_per_class", test_per_class),
            ]
            if v is None
        ]  # noqa: E501
        if missing:
            raise UserError(f"dataset '{name}': register_dataset needs {', '.join(missing)}")
        channels = shape[0]
        spec = DatasetSpec(
            name=name,
            num_classes=int(num_classes),
            train_per_class=int(train_per_class),
            test_per_class=int(test_per_class),
            shape=tuple(int(v) for v in shape),
            mean=tuple(mean or (0.5,) * channels),
            std=tuple(std or (0.5,) * channels),
            default_imbalance_factor=float(imbalance_factor),
            many_threshold=int(many_threshold),
            few_threshold=int(few_threshold),
            crop_padding=int(crop_padding),
            flip=bool(flip),
            needs_files=False,
            note=description,
        )

    def add(load):
        DATASETS.add(name, spec, replace)
        DATASET_LOADERS[name] = load

    if target is None and spec.kind == "files":
        add(None)
        return None
    return _decorator(add, target)
