"""Configuration: frozen dataclasses, one docstring per field.

The dataclasses are the single source of truth for what can be set. Search-space files
(``study/search_spaces/*.yaml``) and ``--set KEY=VALUE`` are validated against them: an unknown key, a
wrong type or an out-of-range value is a :class:`~study.errors.ConfigError` naming the key and the
valid choices. Values are checked in ``__post_init__``, so every way of building a config (YAML,
CLI, tests) goes through the same checks; the search-space loader also builds a config at both
ends of every searched range, so an out-of-range *bound* is caught before any trial runs.

Defaults are the honest protocol with the reference recipes (see ``docs/reference.md``
§4–5). :data:`PROTOCOL_PRESETS` holds what the ``wb-parity`` protocol changes; a search-space file
may still override each value, and every output records the resolved configuration.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from study.config.backbones import MODEL_NAMES, TORCHVISION_BACKBONES, known_model
from study.config.datasets import DATASETS, SAMPLERS, n_max_for
from study.config.methods import METHODS
from study.config.registry import LOSSES as _REGISTRY_LOSSES
from study.config.registry import register_loss
from study.errors import ConfigError, unknown

for _name, _what in [
    ("ce", "cross-entropy"),
    ("cb", "class-balanced loss (Cui et al.) in the form cb_form names"),
    ("focal", "LDAM-DRW's softmax focal loss"),
    ("ldam", "label-distribution-aware margins (Cao et al.)"),
    ("balanced-softmax", "CE on z + log n_c (Ren et al.)"),
    ("la-loss", "logit-adjusted loss, CE on z + tau log pi_c (Menon et al.)"),
]:
    # the built-ins go through the public door a plug-in uses (study.register_loss)
    register_loss(_name, f"study.training.losses:make_{_name.replace('-', '_')}", description=_what)

LOSSES = _REGISTRY_LOSSES
"""The training losses by name (``loss:`` of either stage; ``study.training.losses.make_loss``):
the built-ins above, then any plug-in's."""

PROTOCOLS = ("honest", "wb-parity", "test-selection")
"""``honest``: hyperparameters and best epochs are selected on a validation split carved from the
training images, and the test set is evaluated once per final configuration.
``wb-parity``: no validation split; selection on the test set, exactly as the weight-balancing demo
notebooks do. Kept for reproducing the reference numbers; every output says which protocol it used.
``test-selection``: every switch as under ``honest``, but no validation split: epochs and
hyperparameters are selected on the test set, as the reference code does. It isolates what
test-set selection alone does to the reported numbers (compare with the same space under
``honest``; fix ``data.n_max`` in both so that the training images are identical)."""


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, f"'{value}' is not valid; choose one of: {', '.join(choices)}")


def _range(
    key: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    what: str = "",
) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value}")
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and (value > hi or (hi_open and value == hi))
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        extra = f" ({what})" if what else ""
        raise ConfigError(key, f"{value:g} is out of range; must be in {left}{lo_s}, {hi_s}{right}{extra}")


@dataclass(frozen=True)
class DataConfig:
    """Which long-tailed dataset to build and how."""

    dataset: str = "cifar100-lt"
    """Registered dataset name: ``cifar10-lt``, ``cifar100-lt``, ``fashion-mnist-lt``, ``digits-lt``
    (held in memory), or the file datasets ``imagenet-lt``, ``places-lt``, ``inat2018`` and
    ``split-files`` (Kang et al.'s list format, images read from ``--data-dir``)."""

    imbalance_factor: float | None = None
    """n_max / n_min of the training counts (>= 1; 1 = balanced). None: the dataset's default
    (100 for CIFAR-LT, see ``study data DATASET``)."""

    profile: str = "exp"
    """Count profile over classes: ``exp`` (n_c = floor(n_max * IF^(-c/(C-1))), Cao et al.) or
    ``step`` (the first half of the classes get n_max, the rest n_max / IF)."""

    subset: str = "shuffle"
    """Which images make up each class's subset: ``shuffle`` (per-class seeded shuffle, as LDAM-DRW)
    or ``first`` (the first n_c images in file order, as the WB and ICLR'24 repos)."""

    rounding: str = "floor"
    """How n_c is made an integer: ``floor`` (Python ``int``, LDAM-DRW / WB: CIFAR-100-LT IF 100 has
    10,847 images) or ``round`` (Python ``round``, the ICLR'24 code)."""

    subset_seed: int = 0
    """Seed of the per-class shuffle when ``subset: shuffle`` (LDAM-DRW uses 0). Independent of the
    run seeds, so every seed of a study trains on the same images."""

    val_per_class: int = 20
    """Images per class reserved for the balanced validation split before the long-tailed subset
    is drawn (so n_max becomes n_per_class - val_per_class). 0 means no validation split, which is
    only allowed under the ``wb-parity`` and ``test-selection`` protocols. File datasets: any
    value > 0 selects on the val list (ImageNet-LT, Places-LT, split-files with one); for iNat 2018
    and split-files without a val list it is the most images per class carved from the training
    list (each class keeps at least one)."""

    n_max: int | None = None
    """Training images of the largest class, n_0 of the count profile. None: all that the
    validation split leaves (n_per_class - val_per_class: 480 for CIFAR-100-LT, 5,980 for
    Fashion-MNIST-LT). A smaller value shrinks every class by the same factor, keeping the profile
    and the imbalance factor (a CPU-sized study); it must not exceed that default. Fixing it also
    keeps the training counts identical whether or not a validation split is reserved."""

    val_from: str = "end"
    """Which images of each class's order form the validation split: the last ``val_per_class``
    (``end``: the same images whatever the counts) or those right after the class's n_c training
    images (``after-train``: the ICLR'24 code's choice)."""

    many_threshold: int | None = None
    """A class is Many-shot when it has more than this many training images. None: the dataset's
    default (100 for CIFAR-LT)."""

    few_threshold: int | None = None
    """A class is Few-shot when it has fewer than this many training images; classes in between
    (boundaries included) are Medium. None: the dataset's default (20 for CIFAR-LT)."""

    image_size: int = 224
    """File datasets: the side of the training crop (RandomResizedCrop) and of the evaluation crop
    (after resizing the shorter side to ``image_size * 256 / 224``): 224 as Kang et al.; smaller
    for quick studies (tests use 32)."""

    train_list: str | None = None
    """``split-files``: the training list (``relative/path label`` per line), relative to
    ``--data-dir`` or absolute."""

    val_list: str | None = None
    """``split-files``: the validation list; None: carved from the training list (as for iNat)."""

    test_list: str | None = None
    """``split-files``: the test list."""

    class_names: str | None = None
    """``split-files``: optional file with one class name per line (line i names class i)."""

    def __post_init__(self) -> None:

        if self.dataset not in DATASETS:
            raise ConfigError("dataset", unknown("dataset", self.dataset, DATASETS))
        if DATASETS[self.dataset].kind == "files":
            self._check_file_dataset()
            return
        for key in ("train_list", "val_list", "test_list", "class_names"):
            if getattr(self, key) is not None:
                raise ConfigError(key, f"only for dataset split-files (this is {self.dataset})")
        if self.imbalance_factor is not None:
            _range(
                "imbalance_factor",
                self.imbalance_factor,
                1.0,
                what="1 is balanced; 100 means the largest class has 100x the smallest",
            )
        _choice("profile", self.profile, ("exp", "step"))
        _choice("subset", self.subset, ("shuffle", "first"))
        _choice("rounding", self.rounding, ("floor", "round"))
        _choice("val_from", self.val_from, ("end", "after-train"))
        _range("val_per_class", self.val_per_class, 0)
        spec = DATASETS[self.dataset]
        if self.val_per_class >= spec.train_per_class:
            raise ConfigError(
                "val_per_class",
                f"{self.val_per_class} leaves no training images ({self.dataset} has {spec.train_per_class} per class)",
            )
        if self.n_max is not None:
            _range("n_max", self.n_max, 1)
            most = n_max_for(spec, self.val_per_class)
            if self.n_max > most:
                raise ConfigError(
                    "n_max",
                    f"{self.n_max} is more than the {most} training images per class "
                    f"that {self.dataset} has left after a validation split of "
                    f"{self.val_per_class}; use at most {most} (or null)",
                )
        self._check_thresholds()

    def _check_thresholds(self) -> None:
        if self.many_threshold is not None:
            _range("many_threshold", self.many_threshold, 0)
        if self.few_threshold is not None:
            _range("few_threshold", self.few_threshold, 0)
        if self.resolved_many < self.resolved_few:
            raise ConfigError(
                "few_threshold", f"few_threshold {self.resolved_few} is larger than many_threshold {self.resolved_many}"
            )

    def _check_file_dataset(self) -> None:
        # The lists fix every count: what shapes a long tail out of a balanced pool does not apply.
        for key in ("imbalance_factor", "n_max"):
            if getattr(self, key) is not None:
                raise ConfigError(
                    key, f"does not apply to {self.dataset}: its split lists fix the counts (remove the key)"
                )
        _range("image_size", self.image_size, 8, what="the crop side in pixels (224 as Kang et al.)")
        _range("val_per_class", self.val_per_class, 0)
        if self.dataset == "split-files":
            if not self.train_list or not self.test_list:
                raise ConfigError(
                    "train_list",
                    "split-files needs data.train_list and data.test_list "
                    "(files of 'relative/path label' lines under --data-dir)",
                )
        else:
            for key in ("train_list", "val_list", "test_list", "class_names"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        key, f"only for dataset split-files ({self.dataset} reads its own lists from --data-dir)"
                    )
        self._check_thresholds()

    @property
    def resolved_imbalance_factor(self) -> float:

        return float(
            self.imbalance_factor
            if self.imbalance_factor is not None
            else DATASETS[self.dataset].default_imbalance_factor
        )

    @property
    def resolved_many(self) -> int:

        return self.many_threshold if self.many_threshold is not None else DATASETS[self.dataset].many_threshold

    @property
    def resolved_few(self) -> int:

        return self.few_threshold if self.few_threshold is not None else DATASETS[self.dataset].few_threshold


@dataclass(frozen=True)
class EvalConfig:
    """How accuracies are computed."""

    tta_flip: bool = False
    """Average the logits of each image and its horizontal flip (the WB notebooks' final numbers
    do this). Ignored for datasets where a flip changes the class (digits)."""

    batch_size: int | None = None
    """Images per forward pass during evaluation; results do not depend on it. None: 128 on a CPU
    (larger batches fall out of the caches: 1000 is 2x slower than 64 for ResNet-32), 1024 on a GPU."""

    def __post_init__(self) -> None:
        if self.batch_size is not None:
            _range("batch_size", self.batch_size, 1)

    def batch_for(self, device) -> int:
        """The evaluation batch size on ``device``."""
        if self.batch_size is not None:
            return self.batch_size
        return 1024 if getattr(device, "type", str(device)).startswith("cuda") else 128


@dataclass(frozen=True)
class TrainConfig:
    """Fields shared by both training stages (optimizer, schedule, loss, MaxNorm)."""

    epochs: int = 200
    """Passes over the long-tailed training set."""

    batch_size: int = 64
    """Images per SGD step."""

    lr: float = 0.01
    """Peak learning rate of SGD."""

    momentum: float = 0.9
    """SGD momentum."""

    nesterov: bool = False
    """Nesterov momentum."""

    weight_decay: float = 5e-3
    """Coupled L2 weight decay (PyTorch SGD ``weight_decay``) on every trained tensor, biases and
    batch-norm parameters included, as in the reference. Searched on a log scale."""

    warmup_epochs: int = 0
    """Linear learning-rate warm-up over this many epochs (LDAM-DRW uses 5; the WB recipe 0)."""

    schedule: str = "cosine"
    """Learning-rate schedule after warm-up: ``cosine`` (to 0), ``constant``, or ``step`` (multiplied
    by ``lr_decay`` at each epoch of ``lr_milestones``, as LDAM-DRW's and Cui et al.'s CIFAR scripts)."""

    lr_milestones: tuple[int, ...] = ()
    """``schedule: step``: the 0-based epochs from which the learning rate is multiplied by
    ``lr_decay`` once more (LDAM-DRW: 160, 180). A YAML list, or ``160,180`` in ``--set``."""

    lr_decay: float = 0.1
    """``schedule: step``: the factor at each milestone (LDAM-DRW and Cui et al.: 0.01)."""

    schedule_step: str = "step"
    """When the schedule advances: ``step`` (every SGD step, smooth) or ``epoch-start`` (once per
    epoch, before the epoch, as the WB code does: the first epoch runs just below the peak and the
    last one runs with lr = 0)."""

    loss: str = "ce"
    """``ce`` (cross-entropy), ``cb`` (class-balanced: per-class weights from the effective number
    of samples, Cui et al. 2019), ``focal`` (LDAM-DRW's softmax focal loss, ``focal_gamma``),
    ``ldam`` (Cao et al.'s label-distribution-aware margins, ``ldam_max_m``, ``ldam_s``),
    ``balanced-softmax`` (Ren et al.: CE on z + log n_c) or ``la-loss`` (Menon et al.'s logit-adjusted
    loss: CE on z + tau log pi_c, ``la_tau``). The last two adjust the logits in training only:
    predictions use the plain logits (docs/reference.md §10)."""

    focal_gamma: float = 1.0
    """gamma of ``loss: focal``, (1 - p)^gamma * CE (LDAM-DRW's code uses 1; Lin et al. 2)."""

    ldam_max_m: float = 0.5
    """The largest LDAM margin (the rarest class's); margins scale as n_c^(-1/4)."""

    ldam_s: float = 30.0
    """The scale s LDAM multiplies the margin-shifted logits by (LDAM-DRW's 30)."""

    la_tau: float = 1.0
    """tau of ``loss: la-loss`` (1: the same loss as ``balanced-softmax``)."""

    drw_epoch: int | None = None
    """Deferred re-weighting (Cao et al.): from this 0-based epoch on, the loss is weighted per class
    by the class-balanced weights (``cb_beta``), as LDAM-DRW's ``cifar_train.py`` (epoch 160 of 200).
    None: no re-weighting. Not with ``loss: cb``, which weights every epoch."""

    cb_beta: float = 0.9999
    """beta of the effective number E_c = (1 - beta^n_c)/(1 - beta); 1 gives inverse frequency."""

    cb_form: str = "weighted-ce"
    """How the class-balanced weights enter the loss: ``weighted-ce`` (w_y * CE, mean over the
    batch, as the ICLR'24 code and Cui et al.'s softmax form), ``bce`` (the WB code's binary
    cross-entropy between softmax and one-hot, rows weighted by w_y, mean over batch x classes), or
    Cui et al.'s ``sigmoid`` and ``focal`` forms (per-class sigmoid cross-entropy, with the focal
    modulator of ``focal_gamma`` for ``focal``, rows weighted by w_y, summed over classes, mean over
    the batch)."""

    maxnorm: bool = False
    """Constrain each class's classifier weight row to a norm ball by projected gradient descent.
    The bias is never constrained."""

    maxnorm_threshold: float = 0.1
    """MaxNorm radius. ``relative`` mode: r = min + t * (max - min) of the classifier's row norms at
    the start of the stage, t in [0, 1] (0.1 puts the ball near the smallest norm, as WB does); the
    radius is relative because raw norms depend on backbone, init and dataset, so a relative t is
    comparable across studies. ``absolute`` mode: r = t."""

    maxnorm_mode: str = "relative"
    """``relative`` (the WB definition) or ``absolute``."""

    pgd_every: str = "step"
    """When MaxNorm projects: after every SGD ``step`` (the paper) or once per ``epoch`` after the
    epoch's steps (the WB code; see WB issue #5)."""

    augment: bool = True
    """Random crop (dataset-specific padding) and horizontal flip (where the dataset allows it),
    applied per batch on the trial's device."""

    select_best_epoch: bool = True
    """Keep the epoch with the best selection-split accuracy (validation under ``honest``);
    False keeps the last epoch."""

    amp: bool = False
    """bfloat16 autocast on CUDA devices (ignored on CPU). Faster on recent GPUs; off by default
    so that results match fp32 references."""

    memory_format: str = "auto"
    """Tensor layout of the model and its training batches: ``contiguous`` (NCHW), ``channels_last``
    (NHWC: faster convolutions on many CPUs and on GPU tensor cores) or ``auto`` (what was measured
    fastest on the trial's device: see ``study.training.trainers.AUTO_MEMORY_FORMAT``). Changes float rounding
    only; the resolved value is recorded with every trial."""

    compile: str = "off"
    """``torch.compile`` of the training forward pass: ``off``, ``default`` or ``reduce-overhead``
    (CUDA graphs). Compilation takes seconds to minutes, so it pays back only in long trials."""

    tf32: bool = False
    """Allow TF32 matrix multiplications and convolutions on CUDA (faster on Ampere and newer GPUs,
    ~1e-3 relative rounding); off by default so that results match fp32 references."""

    sampler: str = "instance"
    """How an epoch's batches are drawn (Kang et al.'s samplers, ``study.data.samplers.epoch_order``):
    ``instance`` (every image once per epoch), ``class-balanced`` (the class-aware sampler: classes
    in reshuffled cycles, 4 images per visit), ``square-root`` (class probability proportional to
    sqrt(n_c)) or ``progressive`` (from instance- to class-balanced over the epochs:
    p_c(t) = (1 - t/T) n_c/N + (t/T)/C). Every epoch draws N images, and ``class-balanced``
    starts fresh cycles each epoch (a checkpoint needs only the generator). ``class-aware-kang``
    is Kang et al.'s ClassAwareSampler exactly (``study.data.samplers``): the class cycle and each
    class's cycle carry over from epoch to epoch, and an epoch is floor(N / batch_size) batches,
    as their training loop runs."""

    def __post_init__(self) -> None:
        _range("epochs", self.epochs, 1)
        _range("batch_size", self.batch_size, 1)
        _range("lr", self.lr, 0.0, lo_open=True)
        _range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"{self.weight_decay:g} is negative; weight decay must be >= 0")
        _range("weight_decay", self.weight_decay, 0.0)
        _range("warmup_epochs", self.warmup_epochs, 0)
        if self.warmup_epochs >= self.epochs:
            raise ConfigError("warmup_epochs", f"{self.warmup_epochs} must be smaller than epochs ({self.epochs})")
        _choice("schedule", self.schedule, ("cosine", "constant", "step"))
        _range("lr_decay", self.lr_decay, 0.0, 1.0, lo_open=True)
        if self.schedule == "step":
            ms = list(self.lr_milestones)
            if not ms:
                raise ConfigError(
                    "lr_milestones", "schedule: step needs the epochs where the rate drops, e.g. [160, 180]"
                )
            if ms != sorted(set(ms)) or ms[0] <= self.warmup_epochs or ms[-1] >= self.epochs:
                raise ConfigError(
                    "lr_milestones",
                    f"{ms} must increase strictly, after the warm-up ({self.warmup_epochs} epochs) and "
                    f"before epochs ({self.epochs})",
                )
        elif self.lr_milestones:
            raise ConfigError("lr_milestones", f"only schedule: step reads them (schedule is {self.schedule})")
        _choice("schedule_step", self.schedule_step, ("step", "epoch-start"))
        if self.loss not in LOSSES:
            raise ConfigError("loss", unknown("loss", self.loss, LOSSES))
        _range("cb_beta", self.cb_beta, 0.0, 1.0)
        _range("focal_gamma", self.focal_gamma, 0.0)
        _range("ldam_max_m", self.ldam_max_m, 0.0, lo_open=True)
        _range("ldam_s", self.ldam_s, 0.0, lo_open=True)
        _range("la_tau", self.la_tau, 0.0)
        if self.drw_epoch is not None:
            _range("drw_epoch", self.drw_epoch, 0)
            if self.drw_epoch >= self.epochs:
                raise ConfigError(
                    "drw_epoch", f"{self.drw_epoch} must be smaller than epochs ({self.epochs}) to re-weight at all"
                )
            if self.loss == "cb":
                raise ConfigError(
                    "drw_epoch",
                    "with loss: cb the class-balanced weights apply from the start; use loss: ce "
                    "(or focal, ldam, ...) with drw_epoch, or drop drw_epoch",
                )
        _choice("cb_form", self.cb_form, ("weighted-ce", "bce", "sigmoid", "focal"))
        _choice("maxnorm_mode", self.maxnorm_mode, ("relative", "absolute"))
        if self.maxnorm_mode == "relative":
            _range(
                "maxnorm_threshold",
                self.maxnorm_threshold,
                0.0,
                1.0,
                what="relative: r = min + t*(max - min) of the initial row norms",
            )
        else:
            _range("maxnorm_threshold", self.maxnorm_threshold, 0.0, lo_open=True, what="absolute radius")
        _choice("pgd_every", self.pgd_every, ("step", "epoch"))

        _choice("sampler", self.sampler, SAMPLERS)
        _choice("memory_format", self.memory_format, ("auto", "contiguous", "channels_last"))
        _choice("compile", self.compile, ("off", "default", "reduce-overhead"))


@dataclass(frozen=True)
class Stage1Config(TrainConfig):
    """Stage 1: train backbone and classifier jointly with cross-entropy under a (searched) weight
    decay. Defaults: the WB demo recipe (SGD lr 0.01, momentum 0.9, batch 64, cosine) with the
    paper's 200 epochs."""

    backbone: str = "resnet32"
    """Registered backbone: ``resnet32`` (true CIFAR ResNet-32, 0.47 M parameters, 64-d features),
    ``resnet34-wb`` (the WB code's torchvision ResNet-34 with a 3x3 stem, 21 M, 512-d), ``resnet8``
    (75 k, for fashion-mnist-lt), ``digits-cnn`` (128-d), ``resnetN``; for the large benchmarks
    torchvision's ``resnet10`` (Kang et al.'s), ``resnet50``, ``resnet101``, ``resnet152``,
    ``resnext50_32x4d`` and ``resnext101_32x4d``, randomly initialised unless ``init_from``."""

    init_from: str | None = None
    """A local weights file (a torchvision-style state dict, loaded with ``weights_only=True``) the
    backbone starts from, e.g. ImageNet-pretrained ResNet-152 weights for Places-LT as Kang et al.;
    the classifier is taken from it only when its shape fits. Nothing is ever downloaded."""

    classifier: str = "linear"
    """``linear`` (a trained linear layer with bias), ``etf`` (Hasegawa & Sato: the weight rows are
    fixed to a simplex equiangular tight frame — unit norms, pairwise cosine -1/(C-1), seeded by the
    trial seed — and never train; the bias trains; needs a feature dimension of at least C - 1) or
    ``normed`` (the cosine classifier LDAM-DRW's CIFAR ResNet uses with ``loss: ldam``: logits =
    ``cosine_scale`` * cos(w_c, f), no bias; usable with any loss)."""

    cosine_scale: float = 30.0
    """s of ``classifier: normed``: the logits are s times the cosines, for every loss, the post-hoc
    methods and the test set. ``loss: ldam`` applies its own ``ldam_s`` to the cosines as LDAM-DRW's
    code does (s (cos - m)), whatever this value; 30 = their s, so the two agree by default."""

    feature_reg: float = 0.0
    """Feature regularisation zeta: adds zeta * mean_i ||f_i||^2 / 2 over the batch's penultimate
    features to the loss (Hasegawa & Sato use 0.01)."""

    wd_form: str = "optimizer"
    """How weight decay enters: ``optimizer`` (SGD's coupled ``weight_decay``) or ``loss`` (an explicit
    term weight_decay * sum ||theta||^2 / 2 over the trained parameters, as the ICLR'24 code does;
    for SGD the two give the same update up to float rounding)."""

    def __post_init__(self) -> None:
        super().__post_init__()

        if not known_model(self.backbone):
            raise ConfigError("backbone", unknown("backbone", self.backbone, MODEL_NAMES))
        _choice("classifier", self.classifier, ("linear", "etf", "normed"))
        _range("cosine_scale", self.cosine_scale, 0.0, lo_open=True)
        if self.classifier == "normed":
            if self.maxnorm:
                raise ConfigError(
                    "maxnorm", "classifier: normed has unit-norm rows already; drop maxnorm or use classifier: linear"
                )
            if self.feature_reg:
                raise ConfigError(
                    "feature_reg",
                    "classifier: normed sees unit features, whose norm the penalty cannot change; "
                    "drop feature_reg or use classifier: linear",
                )
        if self.init_from is not None:
            if self.backbone not in TORCHVISION_BACKBONES:
                raise ConfigError(
                    "init_from",
                    f"only for torchvision backbones ({', '.join(TORCHVISION_BACKBONES)}), not {self.backbone}",
                )
            if not os.path.isfile(os.path.expanduser(self.init_from)):
                raise ConfigError(
                    "init_from",
                    f"{self.init_from} is not a file; give a local torchvision-style "
                    "weights file (nothing is downloaded)",
                )
        _range("feature_reg", self.feature_reg, 0.0)
        _choice("wd_form", self.wd_form, ("optimizer", "loss"))


@dataclass(frozen=True)
class Stage2Config(TrainConfig):
    """Stage 2: a new classifier on the frozen stage-1 backbone. Defaults: the WB demo's stage 2
    (10 epochs, lr 0.01, batch 64, cosine) with the weight decay and MaxNorm off; each method
    (``methods.METHODS``) sets its own loss, MaxNorm and sampler on top."""

    method: str = "wb"
    """Registered stage-2 method (see ``study.config.methods``)."""

    epochs: int = 10
    weight_decay: float = 0.0

    bn_mode: str = "eval"
    """Batch-norm layers of the frozen backbone: ``eval`` (frozen running statistics; the backbone
    is bit-identical after stage 2) or ``train`` (batch statistics, running statistics updated, as
    the WB and decoupling code do)."""

    classifier_init: str = "continue"
    """``continue`` from the stage-1 classifier (WB) or ``reinit`` it (cRT)."""

    posthoc_bias: str = "drop"
    """For L2- and tau-normalisation: ``drop`` the bias (Kang et al.) or ``keep`` it (WB demo)."""

    tau: float | None = None
    """Fixed tau for tau-normalisation / logit adjustment. None: pick tau on the selection split
    from the grid 0, tau_step, ..., tau_max."""

    tau_max: float = 2.0
    """Upper end of the tau grid."""

    tau_step: float = 0.1
    """Spacing of the tau grid."""

    def __post_init__(self) -> None:
        super().__post_init__()

        if self.method not in METHODS:
            raise ConfigError("method", unknown("stage-2 method", self.method, METHODS))
        _choice("bn_mode", self.bn_mode, ("eval", "train"))
        _choice("classifier_init", self.classifier_init, ("continue", "reinit"))
        _choice("posthoc_bias", self.posthoc_bias, ("drop", "keep"))
        if self.tau is not None:
            _range("tau", self.tau, 0.0)
        _range("tau_max", self.tau_max, 0.0, lo_open=True)
        _range("tau_step", self.tau_step, 0.0, lo_open=True)

    def tau_grid(self) -> list[float]:
        """The tau values tried on the selection split (just ``tau`` when it is fixed)."""
        if self.tau is not None:
            return [float(self.tau)]
        n = int(round(self.tau_max / self.tau_step))
        return [round(i * self.tau_step, 10) for i in range(n + 1)]


PROTOCOL_PRESETS: dict[str, dict[str, Any]] = {
    "honest": {},
    # What the WB demo notebooks do (docs/reference.md §4–5, §6). A space file may still override any of
    # these; the resolved values are written to study.yaml / metrics.json.
    "wb-parity": {
        "data.subset": "first",
        "data.val_per_class": 0,
        "eval.tta_flip": True,
        "stage1.schedule_step": "epoch-start",
        "stage2.schedule_step": "epoch-start",
        "stage2.pgd_every": "epoch",
        "stage2.cb_form": "bce",
        "stage2.bn_mode": "train",
        "stage2.posthoc_bias": "keep",
    },
    # Only the selection split changes: the honest recipe, selected on the test set.
    "test-selection": {"data.val_per_class": 0},
}


def check_protocol(protocol: str, data: DataConfig) -> None:
    """The protocol and the validation split must agree."""
    _choice("protocol", protocol, PROTOCOLS)
    if protocol == "honest" and data.val_per_class == 0:
        raise ConfigError(
            "data.val_per_class",
            "the honest protocol needs a validation split "
            "(val_per_class > 0); use protocol wb-parity or test-selection to select on the test set",
        )
    if protocol in ("wb-parity", "test-selection") and data.val_per_class != 0:
        raise ConfigError(
            "data.val_per_class",
            f"the {protocol} protocol selects on the test set and "
            "has no validation split; set val_per_class: 0 or use protocol honest",
        )


# --- building dataclasses from plain data, with typed, named errors ---------------------------------


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise a ConfigError naming ``key``.

    YAML 1.1 reads ``1e-4`` (no dot) as a string, so numeric strings are accepted for numbers.
    """
    args = typing.get_args(tp)
    if type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp in (int, float):
        what = "an integer" if tp is int else "a number"
        if isinstance(value, bool):
            raise ConfigError(key, f"expected {what}, got {value!r}")
        if isinstance(value, float) and tp is int:
            if value.is_integer():
                return int(value)
        elif isinstance(value, (int, float)):
            return tp(value)
        elif isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected {what}, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    if typing.get_origin(tp) is tuple:  # tuple[X, ...]: a YAML list, or "a,b" from --set
        item = typing.get_args(tp)[0]
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return tuple(coerce(key, v.strip() if isinstance(v, str) else v, item) for v in value)
    return value


def build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Construct ``cls`` from ``values``: unknown keys, wrong types and range errors become
    ConfigErrors whose key is ``prefix.field``."""
    types = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types:
            raise ConfigError(f"{prefix}.{key}" if prefix else key, unknown("key", key, types))
        kwargs[key] = coerce(f"{prefix}.{key}" if prefix else key, value, types[key])
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.at(prefix) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict (for YAML/JSON provenance)."""
    return dataclasses.asdict(cfg)


__all__ = [
    "PROTOCOLS",
    "PROTOCOL_PRESETS",
    "DataConfig",
    "EvalConfig",
    "TrainConfig",
    "Stage1Config",
    "Stage2Config",
    "check_protocol",
    "build",
    "coerce",
    "field_types",
    "to_dict",
]
