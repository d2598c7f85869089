"""The dataset catalog: what is fixed about each dataset (classes, per-class sizes, statistics,
Many / Medium / Few thresholds, augmentation facts), the long-tailed count profile, and the names of
the samplers. Plain data, no numpy or torch: validating a space needs only these facts; the readers
(``study.data.sources``, ``study.data.filelists``) and the long-tailed build (``study.data.longtail``)
use the same tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from study.config.registry import DATASETS as _REGISTRY_DATASETS
from study.config.registry import DatasetSpec, register_dataset  # noqa: F401  (DatasetSpec: re-exported)
from study.errors import UserError, unknown

DEFAULT_DATA_DIR = "data"
"""Where ``--data-dir`` points when it is not given (``$STUDY_DATA_DIR`` overrides it)."""


# --- counts -----------------------------------------------------------------------------------------


def lt_counts(
    n_max: int, num_classes: int, imbalance_factor: float, profile: str = "exp", rounding: str = "floor"
) -> list[int]:
    """Per-class training counts, class 0 the largest.

    ``exp``: n_c = n_max * (1/IF)^(c/(C-1)), truncated exactly as LDAM-DRW's ``get_img_num_per_cls``
    (Python ``int``; CIFAR-100-LT IF 100 totals 10,847), or with ``rounding: round`` rounded with
    Python's ``round`` as the ICLR'24 code does. ``step``: the first C//2 classes get n_max, the rest
    n_max / IF (same rounding). A class left with no image is an error, not a silent empty class.
    """
    if imbalance_factor < 1:
        raise UserError(
            f"imbalance factor {imbalance_factor:g} is below 1; use 1 for a balanced set, "
            "100 for the standard long tail"
        )
    to_int = round if rounding == "round" else int
    ratio = 1.0 / float(imbalance_factor)
    if profile == "exp":
        if num_classes == 1:
            return [n_max]
        counts = [to_int(n_max * (ratio ** (c / (num_classes - 1.0)))) for c in range(num_classes)]
    elif profile == "step":
        half = num_classes // 2
        counts = [n_max] * half + [to_int(n_max * ratio)] * (num_classes - half)
    else:
        raise UserError(f"unknown count profile '{profile}'; valid: exp, step")
    if min(counts) < 1:
        raise UserError(
            f"imbalance factor {imbalance_factor:g} leaves class {counts.index(min(counts))} with no "
            f"training image (n_max {n_max}); use a factor of at most {n_max}"
        )
    return counts


DIGITS_TEST_PER_CLASS = 50
"""digits-lt: test images per class held out of scikit-learn's bundled digits (with a fixed seed)."""


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
# The WB and LDAM code normalise CIFAR-100 with these CIFAR-10 statistics too (docs/reference.md §1.1).
CIFAR_STD = (0.2023, 0.1994, 0.2010)

_BUILTIN_SPECS: dict[str, DatasetSpec] = {
    "cifar10-lt": DatasetSpec(
        name="cifar10-lt",
        num_classes=10,
        train_per_class=5000,
        test_per_class=1000,
        shape=(3, 32, 32),
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        default_imbalance_factor=100.0,
        # Hasegawa & Sato's CIFAR-10 thresholds: at IF 100 the counts run 5000 ... 50, so the CIFAR-100
        # ones (> 100 / < 20) would give 8 / 2 / 0 classes and an empty Few group; these give 4 / 3 / 3.
        many_threshold=1000,
        few_threshold=200,
        crop_padding=4,
        flip=True,
        note="thresholds 1000/200 as in Hasegawa & Sato (the CIFAR-100 100/20 would leave Few empty; "
        "set data.many_threshold/few_threshold to change them)",
    ),
    "cifar100-lt": DatasetSpec(
        name="cifar100-lt",
        num_classes=100,
        train_per_class=500,
        test_per_class=100,
        shape=(3, 32, 32),
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        default_imbalance_factor=100.0,
        many_threshold=100,
        few_threshold=20,
        crop_padding=4,
        flip=True,
    ),
    # fashion-mnist-lt: real 28x28 grey clothing images, long-tailed like CIFAR-10-LT. n_max =
    # 6000 - val_per_class (5980) and IF 100 give 5980, 3584, 2149, 1288 | 772, 463, 277 | 166, 99, 59
    # (14,837 images); Hasegawa & Sato's MNIST-LT / CIFAR-10-LT thresholds (> 1000 / < 200) put
    # 4 / 3 / 3 classes in Many / Medium / Few (3 / 3 / 4 with n_max 3000), where the CIFAR-100 ones
    # (> 100 / < 20) would give 8 / 2 / 0. Mean / std: the 60,000 official training images (0.2860,
    # 0.3530). Augmentation: random crop with 2 px of black padding (shifts of up to 7%, less than
    # CIFAR's 4 of 32 px: the garments fill most of the 28x28 frame, and larger shifts cut off sleeves
    # and soles) and a horizontal flip (clothing is left-right symmetric: a mirrored garment or shoe
    # is the same class).
    "fashion-mnist-lt": DatasetSpec(
        name="fashion-mnist-lt",
        num_classes=10,
        train_per_class=6000,
        test_per_class=1000,
        shape=(1, 28, 28),
        mean=(0.2860,),
        std=(0.3530,),
        default_imbalance_factor=100.0,
        many_threshold=1000,
        few_threshold=200,
        crop_padding=2,
        flip=True,
        note="thresholds 1000/200 as Hasegawa & Sato use for MNIST-LT (4/3/3 classes at IF 100); files from "
        "--data-dir, DIR/FashionMNIST/raw/ or /usr/share/datasets/fashion-mnist/ "
        "(apt-get install dataset-fashion-mnist)",
    ),
    # digits-lt: n_max = 100 and IF 20 give counts 100, 71, 51, 36, 26, 18, 13, 9, 6, 5. The CIFAR
    # thresholds (>100 / <20 of n_max 500) scale to >20 / <4 here, which would leave no Few class;
    # we instead place the thresholds so the groups split 3 / 3 / 4 like CIFAR-100-LT's 35 / 35 / 30:
    # Many > 40 (100, 71, 51), Medium 15..40 (36, 26, 18), Few < 15 (13, 9, 6, 5).
    "digits-lt": DatasetSpec(
        name="digits-lt",
        num_classes=10,
        train_per_class=124,
        test_per_class=DIGITS_TEST_PER_CLASS,
        shape=(1, 8, 8),
        mean=(0.3053,),
        std=(0.3759,),
        default_imbalance_factor=20.0,
        many_threshold=40,
        few_threshold=15,
        crop_padding=1,
        flip=False,
        max_per_class=100,
        needs_files=False,
        note="scikit-learn's bundled digits; 50 test images per class held out with a fixed seed",
    ),
}


# --- datasets given as split files (study.data.filelists reads them) ------------------------------

SPLITS = ("train", "val", "test")
KANG_REPO = "https://github.com/facebookresearch/classifier-balancing"
OLTR_REPO = "https://github.com/zhmiao/OpenLongTailRecognition-OLTR"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Kang et al.'s RGB_statistics['iNaturalist18'] (data/dataloader.py of classifier-balancing)
INAT_MEAN = (0.466, 0.471, 0.380)
INAT_STD = (0.195, 0.194, 0.192)


@dataclass(frozen=True)
class FileListSpec:
    """What is fixed about a dataset given as split files."""

    name: str
    """Registry name, as ``study data NAME`` takes it."""
    title: str
    """The dataset's name in prose (``ImageNet-LT``)."""
    prefix: str | None
    """List files are ``<prefix>_train.txt`` etc.; None for ``split-files`` (paths given explicitly)."""
    num_classes: int | None
    """C, fixed by the benchmark; None: the number of class names, else the largest label + 1."""
    list_files: tuple[str, ...]
    """The lists the dataset has (``train``, ``val``, ``test``; iNaturalist 2018 has no test list)."""
    test_list: str
    """Which list is the test set: ``test``, or ``val`` for iNaturalist 2018 (as Kang et al. report)."""
    val_list: str | None
    """Which list is the validation split, or None when it is carved from the training list."""
    official_lines: Mapping[str, int]
    """Line counts of the published list files (per list file); empty for ``split-files``."""
    mean: tuple[float, float, float]
    """Per-channel RGB mean used for normalisation."""
    std: tuple[float, float, float]
    """Per-channel RGB standard deviation used for normalisation."""
    color_jitter: bool
    """Whether Kang et al.'s training transform adds ColorJitter(0.4, 0.4, 0.4, 0) (not for iNat)."""
    many_threshold: int = 100
    """A class is Many-shot with more than this many training images."""
    few_threshold: int = 20
    """A class is Few-shot with fewer than this many training images (boundaries are Medium)."""
    note: str = ""
    """Shown by ``study data``."""


FILE_DATASETS: dict[str, FileListSpec] = {
    "imagenet-lt": FileListSpec(
        name="imagenet-lt",
        title="ImageNet-LT",
        prefix="ImageNet_LT",
        num_classes=1000,
        list_files=SPLITS,
        test_list="test",
        val_list="val",
        official_lines={"train": 115846, "val": 20000, "test": 50000},
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        color_jitter=True,
        note="Liu et al.'s ImageNet-LT lists as used by Kang et al. (val list 20 per class, test list 50)",
    ),
    "places-lt": FileListSpec(
        name="places-lt",
        title="Places-LT",
        prefix="Places_LT",
        num_classes=365,
        list_files=SPLITS,
        test_list="test",
        val_list="val",
        official_lines={"train": 62500, "val": 7300, "test": 36500},
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        color_jitter=True,
        note="Liu et al.'s Places-LT lists as used by Kang et al. (val list 20 per class, test list 100)",
    ),
    "inat2018": FileListSpec(
        name="inat2018",
        title="iNaturalist 2018",
        prefix="iNaturalist18",
        num_classes=8142,
        list_files=("train", "val"),
        test_list="val",
        val_list=None,
        official_lines={"train": 437513, "val": 24426},
        mean=INAT_MEAN,
        std=INAT_STD,
        color_jitter=False,
        note="the val list is the test set (Kang et al. report on it); a validation split is carved from the "
        "training list: per class the last min(val_per_class, n_c - 1) images",
    ),
    "split-files": FileListSpec(
        name="split-files",
        title="split files",
        prefix=None,
        num_classes=None,
        list_files=SPLITS,
        test_list="test",
        val_list="val",
        official_lines={},
        # the user's own data: Kang et al.'s default statistics and transform (ImageNet's)
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        color_jitter=True,
        note="your own lists; without a val list a validation split is carved from the training list as for inat2018",
    ),
}


def get_file_spec(name: str) -> FileListSpec:
    """The registered :class:`FileListSpec` called ``name`` (UserError naming the valid ones)."""
    if name not in FILE_DATASETS:
        raise UserError(unknown("dataset", name, FILE_DATASETS))
    return FILE_DATASETS[name]


def _file_spec(fs, imbalance: float) -> DatasetSpec:
    """The DatasetSpec of a split-file dataset, from its ``study.data.filelists`` entry (the one home of
    its classes, statistics, transform and thresholds). The sizes of a balanced pool do not apply
    (the lists fix every count); shape's 224 is the default data.image_size, replaced by the
    configured one when the lists are loaded; C = 0 for split-files until its lists are read."""
    return DatasetSpec(
        name=fs.name,
        num_classes=fs.num_classes or 0,
        train_per_class=0,
        test_per_class=0,
        shape=(3, 224, 224),
        mean=fs.mean,
        std=fs.std,
        default_imbalance_factor=imbalance,
        many_threshold=fs.many_threshold,
        few_threshold=fs.few_threshold,
        crop_padding=0,
        flip=True,
        kind="files",
        color_jitter=fs.color_jitter,
        note=fs.note,
    )


# The published lists' largest / smallest class (ImageNet-LT 1280 / 5, Places-LT 4980 / 5, iNat 1000 / 2);
# a study records the ratio of the lists it actually read (FileLTData.imbalance_factor).
_PUBLISHED_IMBALANCE = {"imagenet-lt": 256.0, "places-lt": 996.0, "inat2018": 500.0, "split-files": 0.0}
_BUILTIN_SPECS.update({name: _file_spec(fs, _PUBLISHED_IMBALANCE[name]) for name, fs in FILE_DATASETS.items()})
for _name, _spec in _BUILTIN_SPECS.items():
    # the built-ins go through the public door a plug-in uses (study.register_dataset); the file
    # datasets are read by study.data.filelists, not by a loader
    register_dataset(_name, f"study.data.sources:LOADERS.{_name}" if _spec.kind == "memory" else None, spec=_spec)

DATASETS = _REGISTRY_DATASETS
"""Name -> :class:`DatasetSpec`: the built-ins above, then any plug-in's (``study.register_dataset``)."""


def get_spec(name: str) -> DatasetSpec:
    """The registered dataset ``name`` (an unknown name is a UserError listing the valid ones)."""
    return DATASETS[name]


def n_max_for(spec: DatasetSpec, val_per_class: int, n_max: int | None = None) -> int:
    """The largest class's training count: the pool left after the validation split (capped by the
    dataset's ``max_per_class``), or the configuration's smaller ``n_max`` (DataConfig checks that it
    fits)."""
    n = spec.train_per_class - val_per_class
    n = min(n, spec.max_per_class) if spec.max_per_class else n
    return n if n_max is None else min(n, n_max)


# --- samplers --------------------------------------------------------------------------------------------

EPOCH_SAMPLERS = ("instance", "class-balanced", "square-root", "progressive")
"""The samplers :func:`epoch_order` draws an epoch of (``instance`` is the plain shuffle)."""
SAMPLERS = EPOCH_SAMPLERS + ("class-aware-kang",)
"""Every sampler a stage can train with; ``class-aware-kang`` keeps state across epochs
(``study.data.samplers.KangClassAwareSampler``, held by the trainer)."""
