"""Long-tailed datasets: counts, subsets and splits (docs/reference.md §1).

Every in-memory dataset is built in the same three steps:

1. load the official balanced train/test images in file order (``study.data.sources``);
2. per class, order the images (file order for ``subset: first``; a seeded shuffle for ``shuffle``,
   identical to LDAM-DRW's ``np.random.seed(s)`` + per-class ``np.random.shuffle``), keep the
   *first* n_c as the long-tailed training subset and reserve ``val_per_class`` images of the same
   order for the balanced validation split: the *last* ones (``val_from: end``, independent of n_c)
   or the ones right after the training images (``val_from: after-train``, as the ICLR'24 code
   does). n_c <= n_max = n_per_class - val_per_class, so the two never overlap. With no validation
   split and ``subset: first`` the training images are exactly the WB demo's; with
   ``subset: first``, ``rounding: round`` and ``val_from: after-train`` the splits are exactly the
   ICLR'24 repository's (CIFAR-100-LT IF 100: 10,457 training images);
3. keep everything as uint8 arrays; batches are cropped, flipped and normalised on the trial's
   device (``study.data.device``), so the training loop does no per-image PIL work.

File datasets (``study.data.filelists``) are :class:`FileLTData`: paths instead of images.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from study.config.datasets import DatasetSpec, get_spec, lt_counts, n_max_for
from study.config.groups import shot_groups
from study.data.sources import RawData
from study.errors import UserError


@dataclass
class LTData:
    """A long-tailed training subset with its balanced validation and test splits (uint8 arrays)."""

    spec: DatasetSpec
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_counts: list[int]
    many_threshold: int
    few_threshold: int
    subset_hash: str
    official: bool | None = None
    source: str = ""

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def selection_split(self) -> str:
        """The split that selects epochs and hyperparameters: 'val', or 'test' when there is no
        validation split (the wb-parity protocol)."""
        return "val" if len(self.val_y) else "test"

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name == "selection":
            name = self.selection_split
        return {
            "train": (self.train_x, self.train_y),
            "val": (self.val_x, self.val_y),
            "test": (self.test_x, self.test_y),
        }[name]

    def groups(self) -> np.ndarray:
        return shot_groups(self.train_counts, self.many_threshold, self.few_threshold)

    def priors(self) -> np.ndarray:
        c = np.asarray(self.train_counts, dtype=np.float64)
        return c / c.sum()


def describe(cfg) -> dict:
    """Counts and group sizes of a DataConfig, without loading any images (``study data``)."""
    spec = get_spec(cfg.dataset)
    n_max = n_max_for(spec, cfg.val_per_class, getattr(cfg, "n_max", None))
    counts = lt_counts(n_max, spec.num_classes, cfg.resolved_imbalance_factor, cfg.profile, cfg.rounding)
    groups = shot_groups(counts, cfg.resolved_many, cfg.resolved_few)
    return {
        "dataset": spec.name,
        "imbalance_factor": cfg.resolved_imbalance_factor,
        "n_max": n_max,
        "profile": cfg.profile,
        "subset": cfg.subset,
        "num_classes": spec.num_classes,
        "train_counts": counts,
        "total_train": int(sum(counts)),
        "val_per_class": cfg.val_per_class,
        "test_per_class": spec.test_per_class,
        "thresholds": {"many_gt": cfg.resolved_many, "few_lt": cfg.resolved_few},
        "groups": {g: int((groups == g).sum()) for g in ("many", "medium", "few")},
    }


def build_lt(raw: RawData, cfg, spec: DatasetSpec | None = None) -> LTData:
    """Draw the long-tailed training subset and the validation split from the balanced pool."""
    spec = spec or get_spec(cfg.dataset)
    C = spec.num_classes
    V = cfg.val_per_class
    counts = lt_counts(
        n_max_for(spec, V, getattr(cfg, "n_max", None)), C, cfg.resolved_imbalance_factor, cfg.profile, cfg.rounding
    )
    # LDAM-DRW seeds numpy's global RNG and shuffles class by class in order; a RandomState with the
    # same seed gives the identical sequence without touching global state.
    rng = np.random.RandomState(cfg.subset_seed) if cfg.subset == "shuffle" else None
    train_idx, val_idx = [], []
    for c in range(C):
        idx = np.where(raw.train_y == c)[0]
        if idx.size < counts[c] + V:
            raise UserError(
                f"{spec.name}: class {c} has {idx.size} training images, fewer than the "
                f"{counts[c]} + {V} (train + validation) needed; the data files are incomplete"
            )
        if rng is not None:
            rng.shuffle(idx)
        train_idx.append(idx[: counts[c]])
        if V:
            val_idx.append(idx[counts[c] : counts[c] + V] if cfg.val_from == "after-train" else idx[idx.size - V :])
    tr = np.concatenate(train_idx)
    va = np.concatenate(val_idx) if V else np.zeros(0, dtype=np.int64)
    data = LTData(
        spec=spec,
        train_x=raw.train_x[tr],
        train_y=raw.train_y[tr],
        val_x=raw.train_x[va],
        val_y=raw.train_y[va],
        test_x=raw.test_x,
        test_y=raw.test_y,
        train_counts=counts,
        many_threshold=cfg.resolved_many,
        few_threshold=cfg.resolved_few,
        subset_hash="",
        official=raw.official,
        source=raw.source,
    )
    data.subset_hash = subset_hash(data)
    return data


def subset_hash(data: LTData) -> str:
    """sha256 over the exact images and labels of every split (first 16 hex digits): two results
    with the same hash were trained, selected and tested on identical data."""
    h = hashlib.sha256(data.spec.name.encode())
    for arr in (data.train_x, data.train_y, data.val_x, data.val_y, data.test_x, data.test_y):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def load_data(cfg, data_dir: str | os.PathLike | None = None, download: bool = True) -> LTData | FileLTData:
    """Load the dataset's files and build the long-tailed splits for ``cfg`` (a DataConfig)."""
    spec = get_spec(cfg.dataset)
    if spec.kind == "files":
        return load_file_data(cfg, data_dir)
    from study.config.registry import DATASET_LOADERS, resolve

    return build_lt(resolve(DATASET_LOADERS[spec.name])(data_dir, download), cfg, spec)


@dataclass
class FileLTData(LTData):
    """A file dataset's splits: ``train_x``, ``val_x`` and ``test_x`` hold relative image paths under
    ``root`` (not images: those are read batch by batch during training, never all at once), with
    int64 labels, counts and groups as for the in-memory datasets."""

    root: str = ""
    class_names: list[str] | None = None
    _splits: dict = field(default_factory=dict, repr=False, compare=False)
    """The StreamSplits made for this process (``make_split``), shared by every trainer of a trial
    (one seed after another) and by the trials an actor runs: one pool of decoding workers per
    (split, transform, workers, device), not one per seed. Never pickled."""

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_splits": {}}

    @property
    def image_size(self) -> int:
        return self.spec.shape[1]

    @property
    def imbalance_factor(self) -> float:
        present = [c for c in self.train_counts if c > 0]
        return float(max(present) / min(present)) if present else float("nan")


def load_file_data(cfg, data_dir) -> FileLTData:
    """Read and check a file dataset's lists (``study.data.filelists``): every named image exists, every
    label is in range, before anything is written."""
    from dataclasses import replace

    from study.data.filelists import load_file_lists

    lists = {k: getattr(cfg, k) for k in ("train_list", "val_list", "test_list") if getattr(cfg, k, None)}
    data_dir = data_dir or os.environ.get("STUDY_DATA_DIR") or None
    fl = load_file_lists(
        cfg.dataset,
        data_dir,
        val_per_class=cfg.val_per_class,
        lists=lists or None,
        class_names=getattr(cfg, "class_names", None),
    )
    spec = replace(get_spec(cfg.dataset), num_classes=fl.num_classes, shape=(3, cfg.image_size, cfg.image_size))
    return FileLTData(
        spec=spec,
        root=str(fl.root),
        train_x=fl.train_paths,
        train_y=fl.train_y,
        val_x=fl.val_paths,
        val_y=fl.val_y,
        test_x=fl.test_paths,
        test_y=fl.test_y,
        train_counts=list(fl.train_counts),
        many_threshold=cfg.resolved_many,
        few_threshold=cfg.resolved_few,
        subset_hash=fl.lists_hash,
        official=fl.official,
        source=fl.source,
        class_names=fl.class_names,
    )


def loader_workers(data, cpus: float | None = None) -> int:
    """DataLoader processes that decode a file dataset's images: ``cpus`` of them (a trial's CPUs),
    or up to 4 on this machine when not given; none for the in-memory datasets."""
    if not isinstance(data, FileLTData):
        return 0
    return max(0, int(cpus)) if cpus is not None else min(4, os.cpu_count() or 1)
