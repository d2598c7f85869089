"""Long-tailed datasets: counts, subsets, splits, real loading and on-device augmentation.

Every dataset is built in the same three steps (docs/reference.md §1):

1. load the official balanced train/test images in file order (torchvision's CIFAR and IDX
   readers, or scikit-learn's bundled ``digits`` with a fixed balanced test hold-out);
2. per class, order the images (file order for ``subset: first``; a seeded shuffle for ``shuffle``,
   identical to LDAM-DRW's ``np.random.seed(s)`` + per-class ``np.random.shuffle``), keep the
   *first* n_c as the long-tailed training subset and reserve ``val_per_class`` images of the same
   order for the balanced validation split: the *last* ones (``val_from: end``, independent of n_c)
   or the ones right after the training images (``val_from: after-train``, as the ICLR'24 code
   does). n_c <= n_max = n_per_class - val_per_class, so the two never overlap. With no validation
   split and ``subset: first`` the training images are exactly the WB demo's; with
   ``subset: first``, ``rounding: round`` and ``val_from: after-train`` the splits are exactly the
   ICLR'24 repository's (CIFAR-100-LT IF 100: 10,457 training images);
3. keep everything as uint8 tensors; batches are cropped, flipped and normalised on the trial's
   device, so the training loop does no per-image PIL work.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import socket
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from study.errors import UserError, unknown

DEFAULT_DATA_DIR = "data"


@dataclass
class RawData:
    """Balanced official splits, images as uint8 N x C x H x W in file order."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    official: bool | None = None
    """True when the files match the official release's checksums (None: not applicable)."""
    source: str = ""


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
    load: Callable[[str | os.PathLike | None, bool], RawData] = field(repr=False, compare=False)
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


# --- counts -----------------------------------------------------------------------------------------

def lt_counts(n_max: int, num_classes: int, imbalance_factor: float, profile: str = "exp",
              rounding: str = "floor") -> list[int]:
    """Per-class training counts, class 0 the largest.

    ``exp``: n_c = n_max * (1/IF)^(c/(C-1)), truncated exactly as LDAM-DRW's ``get_img_num_per_cls``
    (Python ``int``; CIFAR-100-LT IF 100 totals 10,847), or with ``rounding: round`` rounded with
    Python's ``round`` as the ICLR'24 code does. ``step``: the first C//2 classes get n_max, the rest
    n_max / IF (same rounding). A class left with no image is an error, not a silent empty class.
    """
    if imbalance_factor < 1:
        raise UserError(f"imbalance factor {imbalance_factor:g} is below 1; use 1 for a balanced set, "
                        "100 for the standard long tail")
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
        raise UserError(f"imbalance factor {imbalance_factor:g} leaves class {counts.index(min(counts))} with no "
                        f"training image (n_max {n_max}); use a factor of at most {n_max}")
    return counts


from study.config.groups import shot_groups  # noqa: E402,F401  (part of this module's API)


# --- loaders ----------------------------------------------------------------------------------------

def _network_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cifar_loader(num_classes: int) -> Callable[[str | os.PathLike | None, bool], RawData]:
    def load(data_dir: str | os.PathLike | None, download: bool = True) -> RawData:
        from torchvision.datasets import CIFAR10, CIFAR100
        from torchvision.datasets.utils import check_integrity

        cls = CIFAR100 if num_classes == 100 else CIFAR10
        root = Path(data_dir or DEFAULT_DATA_DIR).expanduser().resolve()
        folder = root / cls.base_folder
        names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [n for n in names if not (folder / n).is_file()]
        archive = cls.url.rsplit("/", 1)[-1]
        if missing and download and _network_reachable("www.cs.toronto.edu"):
            try:
                cls(str(root), train=True, download=True)
            except Exception as e:  # network trouble mid-download: fall through to the clear error
                print(f"download of {cls.url} failed: {e}")
            missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(
                f"CIFAR-{num_classes} files not found: {folder / missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f"; download {cls.url}, extract it so that {folder}/ holds {', '.join(names)},"
                f" or pass --data-dir DIR pointing at the folder that contains {cls.base_folder}/")

        official = all(check_integrity(str(folder / n), md5) for n, md5 in cls.train_list + cls.test_list) \
            and check_integrity(str(folder / cls.meta["filename"]), cls.meta["md5"])

        class Reader(cls):  # type: ignore[misc, valid-type]
            # torchvision's reader, with its md5 gate relaxed: files that are not the official
            # release (e.g. the test suite's generated ones) still load, and the result records
            # `official: false` in its provenance.
            def _check_integrity(self) -> bool:
                return True

            def _load_meta(self) -> None:
                with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                    self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
                self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        try:
            train = Reader(str(root), train=True)
            test = Reader(str(root), train=False)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError,
                AttributeError, OSError) as e:
            raise UserError(f"CIFAR-{num_classes} files in {folder} are truncated or corrupt "
                            f"({type(e).__name__}: {str(e)[:80]}); delete the folder and extract "
                            f"{archive} again") from None

        def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
            x = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2))
            y = np.asarray(ds.targets, dtype=np.int64)
            return x, y

        tx, ty = arrays(train)
        vx, vy = arrays(test)
        for split, y in (("train", ty), ("test", vy)):
            if y.size == 0 or y.min() < 0 or y.max() >= num_classes:
                raise UserError(f"CIFAR-{num_classes} {split} labels in {folder} are outside 0..{num_classes - 1}; "
                                f"the files are not CIFAR-{num_classes} (re-extract {archive})")
        return RawData(tx, ty, vx, vy, official=official, source=str(folder))

    return load


DIGITS_TEST_PER_CLASS = 50
DIGITS_SPLIT_SEED = 20240601


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``load_digits()`` images (1797 x 8 x 8, values 0-16) and targets, read from
    its bundled ``digits.csv.gz`` as load_digits reads it, without importing scikit-learn (which
    imports scipy: most of a second per process for a 1797-line file)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits  # another layout: the public API

    d = load_digits()
    return d.images, d.target


def _load_digits(data_dir: str | os.PathLike | None = None, download: bool = True) -> RawData:
    """scikit-learn's bundled 8x8 ``digits`` (1,797 real scans, 174-183 per class).

    A fixed seeded hold-out of 50 images per class is the balanced test set; the rest is the pool
    the long-tailed subset and the validation split are drawn from. The hold-out seed is fixed so
    every study of this dataset tests on the same images.
    """
    images, target = _digits_arrays()
    x = np.clip(np.round(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    y = target.astype(np.int64)
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    test_idx, pool_idx = [], []
    for c in range(10):
        idx = np.where(y == c)[0]
        perm = rng.permutation(idx.size)
        test_idx.append(np.sort(idx[perm[:DIGITS_TEST_PER_CLASS]]))
        pool_idx.append(np.sort(idx[perm[DIGITS_TEST_PER_CLASS:]]))
    test_idx = np.concatenate(test_idx)
    pool_idx = np.sort(np.concatenate(pool_idx))  # file order within each class is kept
    return RawData(x[pool_idx], y[pool_idx], x[test_idx], y[test_idx], official=None,
                   source="sklearn.datasets.load_digits")


FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")
FASHION_MNIST_MD5 = {
    # md5 of the *uncompressed* official files (Zalando's release; identical in Debian's
    # dataset-fashion-mnist 0.0~git20200523.55506a9-1). The content is checked rather than the .gz
    # files because Debian recompresses them: its .gz md5s (cf8536b0..., 10bea18f..., f78720b4...,
    # 0d30e22e...) differ from the upstream ones torchvision lists (8d4fb7e6..., 25c81989...,
    # bef4ecab..., bb300cfd...), while the decompressed bytes are the same. sha256 of the same
    # uncompressed files: c59f468a..., bad3541b..., 5b4141f0..., 0402a96d....
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
FASHION_MNIST_SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
"""Tried after ``--data-dir``: where Debian's ``dataset-fashion-mnist`` package installs the files."""
FASHION_MNIST_HOST = "fashion-mnist.s3-website.eu-central-1.amazonaws.com"  # torchvision's mirror


def _idx_path(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz`` (the uncompressed file first: no decompression)."""
    for p in (folder / name, folder / f"{name}.gz"):
        if p.is_file():
            return p
    return None


def _read_idx(path: Path, images: bool) -> tuple[np.ndarray, str]:
    """One IDX file through torchvision's reader, gzipped or not; returns the array and the md5 of
    the uncompressed bytes."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    reader = read_image_file if images else read_label_file
    blob = path.read_bytes()
    if path.suffix == ".gz":
        blob = gzip.decompress(blob)
        # torchvision's reader takes a path to an uncompressed file: decompress into a private
        # temporary file (the Debian folder is read-only, and nothing is left behind).
        with tempfile.TemporaryDirectory(prefix="study-idx-") as tmp:
            plain = Path(tmp) / path.stem
            plain.write_bytes(blob)
            arr = reader(str(plain)).numpy()
    else:
        arr = reader(str(path)).numpy()
    return arr, hashlib.md5(blob).hexdigest()


def _load_fashion_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> RawData:
    """Fashion-MNIST (Xiao et al. 2017: 60,000 training / 10,000 test 28x28 grey images of 10
    clothing classes, 6,000 / 1,000 per class) from the four official IDX files, gzipped or not.

    Looked for, in order: ``DIR/FashionMNIST/raw/`` (torchvision's layout), ``DIR/`` itself (a
    folder holding the four files), then Debian's ``/usr/share/datasets/fashion-mnist/``; ``DIR`` is
    ``--data-dir`` (default ``./data``). When none has them and the network allows, torchvision
    downloads them into ``DIR/FashionMNIST/raw/``."""
    root = Path(data_dir or DEFAULT_DATA_DIR).expanduser().resolve()
    raw_dir = root / "FashionMNIST" / "raw"  # torchvision's FashionMNIST(root).raw_folder
    folders = [raw_dir, root, *(Path(d) for d in FASHION_MNIST_SYSTEM_DIRS)]

    def find() -> tuple[Path, dict[str, Path]]:
        """The first folder holding all four files; else the one holding most of them."""
        best: tuple[Path, dict[str, Path]] = (folders[0], {})
        for folder in folders:
            found = {n: p for n in FASHION_MNIST_FILES if (p := _idx_path(folder, n)) is not None}
            if len(found) == len(FASHION_MNIST_FILES):
                return folder, found
            if len(found) > len(best[1]):
                best = (folder, found)
        return best

    folder, files = find()
    if len(files) < len(FASHION_MNIST_FILES) and download and _network_reachable(FASHION_MNIST_HOST, 80):
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(root), train=True, download=True)
        except Exception as e:  # network trouble mid-download: fall through to the clear error
            print(f"download of Fashion-MNIST from {FASHION_MNIST_HOST} failed: {e}")
        folder, files = find()
    wanted = ", ".join(f"{n}[.gz]" for n in FASHION_MNIST_FILES)
    if files and len(files) < len(FASHION_MNIST_FILES):  # a folder holds part of them: say what is missing
        missing = ", ".join(f"{n}[.gz]" for n in FASHION_MNIST_FILES if n not in files)
        raise UserError(f"Fashion-MNIST files incomplete: {folder}/ lacks {missing}; put all four files there, "
                        f"run `apt-get install dataset-fashion-mnist`, or pass --data-dir DIR for a folder "
                        f"holding {wanted}")
    if not files:
        raise UserError(
            f"Fashion-MNIST files not found in {', '.join(f'{d}/' for d in folders[:-1])} or {folders[-1]}/"
            f"; run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --data-dir DIR "
            f"for a folder holding {wanted} (or DIR/FashionMNIST/raw/, torchvision's layout)")

    arrays, official = {}, True
    for n, path in files.items():
        try:
            arr, md5 = _read_idx(path, images="images" in n)
        except (AssertionError, TypeError, ValueError, RuntimeError, KeyError, IndexError, OSError, EOFError,
                zlib.error) as e:
            raise UserError(f"Fashion-MNIST file {path} is truncated or corrupt ({type(e).__name__}: "
                            f"{str(e)[:80]}); reinstall dataset-fashion-mnist or fetch the official files "
                            f"again") from None
        arrays[n] = arr
        official = official and md5 == FASHION_MNIST_MD5[n]
    out = []
    for split in ("train", "t10k"):
        x, y = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"].astype(np.int64)
        if x.shape[1:] != (28, 28):
            raise UserError(f"Fashion-MNIST {split} images in {folder} are {x.shape[1]}x{x.shape[2]}, not 28x28; "
                            "the files are not Fashion-MNIST")
        if len(x) != len(y):
            raise UserError(f"Fashion-MNIST {split} files in {folder} disagree: {len(x)} images but {len(y)} labels")
        if y.size == 0 or y.min() < 0 or y.max() >= 10:
            raise UserError(f"Fashion-MNIST {split} labels in {folder} are outside 0..9; the files are not "
                            "Fashion-MNIST")
        out += [np.ascontiguousarray(x[:, None], dtype=np.uint8), y]
    return RawData(*out, official=official, source=str(folder))


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
# The WB and LDAM code normalise CIFAR-100 with these CIFAR-10 statistics too (docs/reference.md §1.1).
CIFAR_STD = (0.2023, 0.1994, 0.2010)

DATASETS: dict[str, DatasetSpec] = {
    "cifar10-lt": DatasetSpec(
        name="cifar10-lt", num_classes=10, train_per_class=5000, test_per_class=1000,
        shape=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, default_imbalance_factor=100.0,
        # Hasegawa & Sato's CIFAR-10 thresholds: at IF 100 the counts run 5000 ... 50, so the CIFAR-100
        # ones (> 100 / < 20) would give 8 / 2 / 0 classes and an empty Few group; these give 4 / 3 / 3.
        many_threshold=1000, few_threshold=200, crop_padding=4, flip=True, load=_cifar_loader(10),
        note="thresholds 1000/200 as in Hasegawa & Sato (the CIFAR-100 100/20 would leave Few empty; "
             "set data.many_threshold/few_threshold to change them)"),
    "cifar100-lt": DatasetSpec(
        name="cifar100-lt", num_classes=100, train_per_class=500, test_per_class=100,
        shape=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, default_imbalance_factor=100.0,
        many_threshold=100, few_threshold=20, crop_padding=4, flip=True, load=_cifar_loader(100)),
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
        name="fashion-mnist-lt", num_classes=10, train_per_class=6000, test_per_class=1000,
        shape=(1, 28, 28), mean=(0.2860,), std=(0.3530,), default_imbalance_factor=100.0,
        many_threshold=1000, few_threshold=200, crop_padding=2, flip=True, load=_load_fashion_mnist,
        note="thresholds 1000/200 as Hasegawa & Sato use for MNIST-LT (4/3/3 classes at IF 100); files from "
             "--data-dir, DIR/FashionMNIST/raw/ or /usr/share/datasets/fashion-mnist/ "
             "(apt-get install dataset-fashion-mnist)"),
    # digits-lt: n_max = 100 and IF 20 give counts 100, 71, 51, 36, 26, 18, 13, 9, 6, 5. The CIFAR
    # thresholds (>100 / <20 of n_max 500) scale to >20 / <4 here, which would leave no Few class;
    # we instead place the thresholds so the groups split 3 / 3 / 4 like CIFAR-100-LT's 35 / 35 / 30:
    # Many > 40 (100, 71, 51), Medium 15..40 (36, 26, 18), Few < 15 (13, 9, 6, 5).
    "digits-lt": DatasetSpec(
        name="digits-lt", num_classes=10, train_per_class=124, test_per_class=DIGITS_TEST_PER_CLASS,
        shape=(1, 8, 8), mean=(0.3053,), std=(0.3759,), default_imbalance_factor=20.0,
        many_threshold=40, few_threshold=15, crop_padding=1, flip=False, load=_load_digits,
        max_per_class=100, needs_files=False,
        note="scikit-learn's bundled digits; 50 test images per class held out with a fixed seed"),
}


def _file_spec(fs, imbalance: float) -> DatasetSpec:
    """The DatasetSpec of a split-file dataset, from its ``study.data.filelists`` entry (the one home of
    its classes, statistics, transform and thresholds). The sizes of a balanced pool do not apply
    (the lists fix every count); shape's 224 is the default data.image_size, replaced by the
    configured one when the lists are loaded; C = 0 for split-files until its lists are read."""
    return DatasetSpec(name=fs.name, num_classes=fs.num_classes or 0, train_per_class=0, test_per_class=0,
                       shape=(3, 224, 224), mean=fs.mean, std=fs.std, default_imbalance_factor=imbalance,
                       many_threshold=fs.many_threshold, few_threshold=fs.few_threshold, crop_padding=0,
                       flip=True, load=_no_raw_loader, kind="files", color_jitter=fs.color_jitter, note=fs.note)


def _no_raw_loader(data_dir, download=True) -> RawData:
    raise TypeError("file datasets are loaded by load_data through study.data.filelists")


from study.data.filelists import FILE_DATASETS  # noqa: E402  (numpy only)

# The published lists' largest / smallest class (ImageNet-LT 1280 / 5, Places-LT 4980 / 5, iNat 1000 / 2);
# a study records the ratio of the lists it actually read (FileLTData.imbalance_factor).
_PUBLISHED_IMBALANCE = {"imagenet-lt": 256.0, "places-lt": 996.0, "inat2018": 500.0, "split-files": 0.0}
DATASETS.update({name: _file_spec(fs, _PUBLISHED_IMBALANCE[name]) for name, fs in FILE_DATASETS.items()})


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(unknown("dataset", name, DATASETS))
    return DATASETS[name]


# --- the long-tailed dataset --------------------------------------------------------------------------

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
        return {"train": (self.train_x, self.train_y), "val": (self.val_x, self.val_y),
                "test": (self.test_x, self.test_y)}[name]

    def groups(self) -> np.ndarray:
        return shot_groups(self.train_counts, self.many_threshold, self.few_threshold)

    def priors(self) -> np.ndarray:
        c = np.asarray(self.train_counts, dtype=np.float64)
        return c / c.sum()


def n_max_for(spec: DatasetSpec, val_per_class: int, n_max: int | None = None) -> int:
    """The largest class's training count: the pool left after the validation split (capped by the
    dataset's ``max_per_class``), or the configuration's smaller ``n_max`` (DataConfig checks that it
    fits)."""
    n = spec.train_per_class - val_per_class
    n = min(n, spec.max_per_class) if spec.max_per_class else n
    return n if n_max is None else min(n, n_max)


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
    counts = lt_counts(n_max_for(spec, V, getattr(cfg, "n_max", None)), C, cfg.resolved_imbalance_factor,
                       cfg.profile, cfg.rounding)
    # LDAM-DRW seeds numpy's global RNG and shuffles class by class in order; a RandomState with the
    # same seed gives the identical sequence without touching global state.
    rng = np.random.RandomState(cfg.subset_seed) if cfg.subset == "shuffle" else None
    train_idx, val_idx = [], []
    for c in range(C):
        idx = np.where(raw.train_y == c)[0]
        if idx.size < counts[c] + V:
            raise UserError(f"{spec.name}: class {c} has {idx.size} training images, fewer than the "
                            f"{counts[c]} + {V} (train + validation) needed; the data files are incomplete")
        if rng is not None:
            rng.shuffle(idx)
        train_idx.append(idx[:counts[c]])
        if V:
            val_idx.append(idx[counts[c]:counts[c] + V] if cfg.val_from == "after-train" else idx[idx.size - V:])
    tr = np.concatenate(train_idx)
    va = np.concatenate(val_idx) if V else np.zeros(0, dtype=np.int64)
    data = LTData(
        spec=spec,
        train_x=raw.train_x[tr], train_y=raw.train_y[tr],
        val_x=raw.train_x[va], val_y=raw.train_y[va],
        test_x=raw.test_x, test_y=raw.test_y,
        train_counts=counts, many_threshold=cfg.resolved_many, few_threshold=cfg.resolved_few,
        subset_hash="", official=raw.official, source=raw.source,
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


def load_data(cfg, data_dir: str | os.PathLike | None = None, download: bool = True) -> "LTData | FileLTData":
    """Load the dataset's files and build the long-tailed splits for ``cfg`` (a DataConfig)."""
    spec = get_spec(cfg.dataset)
    if spec.kind == "files":
        return load_file_data(cfg, data_dir)
    return build_lt(spec.load(data_dir, download), cfg, spec)


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
    fl = load_file_lists(cfg.dataset, data_dir, val_per_class=cfg.val_per_class, lists=lists or None,
                         class_names=getattr(cfg, "class_names", None))
    spec = replace(get_spec(cfg.dataset), num_classes=fl.num_classes,
                   shape=(3, cfg.image_size, cfg.image_size))
    return FileLTData(spec=spec, root=str(fl.root), train_x=fl.train_paths, train_y=fl.train_y,
                      val_x=fl.val_paths, val_y=fl.val_y, test_x=fl.test_paths, test_y=fl.test_y,
                      train_counts=list(fl.train_counts), many_threshold=cfg.resolved_many,
                      few_threshold=cfg.resolved_few, subset_hash=fl.lists_hash, official=fl.official,
                      source=fl.source, class_names=fl.class_names)


def loader_workers(data, cpus: float | None = None) -> int:
    """DataLoader processes that decode a file dataset's images: ``cpus`` of them (a trial's CPUs),
    or up to 4 on this machine when not given; none for the in-memory datasets."""
    if not isinstance(data, FileLTData):
        return 0
    return max(0, int(cpus)) if cpus is not None else min(4, os.cpu_count() or 1)


def make_split(data, name: str, device, *, augment: bool = False, workers: int = 0):
    """The split ``name`` ('train', 'val', 'test' or 'selection') ready for a trainer on ``device``:
    a DeviceSplit of the uint8 images (augmented batch-wise on the device by an Augmenter), or for
    a file dataset a ``study.data.streaming.StreamSplit`` that decodes and transforms images in
    ``workers`` DataLoader processes (Kang et al.'s train transform with ``augment``, else the
    evaluation transform)."""
    x, y = data.split(name)
    if not isinstance(data, FileLTData):
        return DeviceSplit(x, y, device)
    from study.data.streaming import KangTransform, StreamSplit

    key = (data.selection_split if name == "selection" else name, bool(augment), int(workers), str(device))
    if key not in data._splits:  # every sample's randomness is its own (seeded per position): sharing is exact
        spec = data.spec
        transform = KangTransform(data.image_size, train=augment, mean=spec.mean, std=spec.std,
                                  jitter=0.4 if spec.color_jitter else 0.0)
        data._splits[key] = StreamSplit(data.root, x, y, transform, device=device, num_workers=workers)
    return data._splits[key]


# --- on-device batches ------------------------------------------------------------------------------

class DeviceSplit:
    """One split held on the trial's device as uint8 images and int64 labels."""

    def __init__(self, x: np.ndarray, y: np.ndarray, device):
        import torch

        self.x = torch.as_tensor(np.ascontiguousarray(x)).to(device)
        self.y = torch.as_tensor(np.ascontiguousarray(y)).to(device)

    def __len__(self) -> int:
        return int(self.y.shape[0])


class Augmenter:
    """Normalisation and batched augmentation on the device (random crop with zero padding,
    horizontal flip), equivalent to torchvision's RandomCrop(pad) + RandomHorizontalFlip +
    Normalize applied image by image. Random numbers come from a CPU generator so a run's random
    stream is the same on every device and is saved in checkpoints."""

    def __init__(self, spec: DatasetSpec, device, augment: bool = True):
        import torch

        self.device = device
        self.mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
        self.pad = spec.crop_padding if augment else 0
        self.flip = spec.flip and augment

    def normalize(self, x_uint8):
        return (x_uint8.float().div_(255.0) - self.mean) / self.std

    def __call__(self, x_uint8, gen):
        import torch
        import torch.nn.functional as F

        x = x_uint8
        B, C, H, W = x.shape
        if self.pad:
            # One gather over the flattened zero-padded uint8 images (zero = black, as RandomCrop on
            # PIL): ~8x faster than 4-d advanced indexing on CPU (benchmarks/bench_data_pipeline.py).
            p = self.pad
            Hp, Wp = H + 2 * p, W + 2 * p
            off = torch.randint(0, 2 * p + 1, (B, 2), generator=gen).to(x.device)
            start = off[:, 0] * Wp + off[:, 1]  # B
            window = (torch.arange(H, device=x.device)[:, None] * Wp
                      + torch.arange(W, device=x.device)[None, :]).flatten()  # H*W
            index = (start[:, None] + window[None, :])[:, None, :].expand(B, C, H * W)
            x = torch.gather(F.pad(x, (p, p, p, p)).reshape(B, C, Hp * Wp), 2, index).reshape(B, C, H, W)
        x = x.float().div_(255.0)
        if self.flip:
            mask = (torch.rand(B, generator=gen) < 0.5).to(x.device)
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        return (x - self.mean) / self.std


EPOCH_SAMPLERS = ("instance", "class-balanced", "square-root", "progressive")
"""The samplers :func:`epoch_order` draws an epoch of (``instance`` is the plain shuffle)."""
SAMPLERS = EPOCH_SAMPLERS + ("class-aware-kang",)
"""Every sampler a stage can train with; ``class-aware-kang`` keeps state across epochs
(``study.data.samplers.KangClassAwareSampler``, held by the trainer)."""


def _class_index(labels, num_classes: int):
    """Per-class image counts (length ``num_classes``) and the dataset indices grouped by class
    (ascending class, each class's indices ascending) with each class's start offset."""
    import torch

    counts = torch.bincount(labels, minlength=num_classes)[:num_classes]
    grouped = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    return counts, grouped, starts


def _class_draws(labels, num_classes: int, probs, gen):
    """N draws of the multinomial-class + per-class-cycle scheme: each draw picks a class from
    ``probs`` (one ``torch.multinomial`` call, with replacement, over the non-empty classes only),
    then the class's next image from its own reshuffled cycle. A class drawn k_c times with n_c
    images takes the first k_c entries of ceil(k_c / n_c) concatenated random permutations of its
    images (each permutation the argsort of n_c float64 uniforms), so its images are drawn without
    replacement as far as possible: within a class, the draw counts of any two images differ by at
    most 1. Random numbers: the class draw first, then one ``torch.rand`` per drawn class in
    ascending class order — all from ``gen``."""
    import torch

    n = int(labels.shape[0])
    counts, grouped, starts = _class_index(labels, num_classes)
    present = torch.nonzero(counts > 0).flatten()
    if n == 0 or present.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    p = probs.to(torch.float64)[present]
    cls = present[torch.multinomial(p, n, replacement=True, generator=gen)]  # class of each draw
    drawn = torch.bincount(cls, minlength=num_classes)
    slots = torch.argsort(cls, stable=True)  # draw positions grouped by class, in draw order
    fills = []
    for c in present.tolist():
        k, nc = int(drawn[c]), int(counts[c])
        if k == 0:
            continue
        cycles = -(-k // nc)
        perm = torch.rand(cycles, nc, generator=gen, dtype=torch.float64).argsort(dim=1).flatten()[:k]
        fills.append(grouped[int(starts[c]) + perm])
    out = torch.empty(n, dtype=torch.int64)
    out[slots] = torch.cat(fills)
    return out


def epoch_order(labels, num_classes: int, sampler: str, gen, epoch: int = 0, epochs: int = 1):
    """Indices for one epoch (CPU int64 tensor of length N = ``len(labels)``), the stage-1 samplers
    of Kang et al. (ICLR 2020), with n_c the number of images of class c in ``labels``, C the number
    of non-empty classes, and every random number drawn from ``gen`` (a CPU ``torch.Generator``), so
    the order is a function of the generator state and a resumed run replays it exactly. Empty
    classes (n_c = 0) are never drawn.

    ``instance``: a random permutation (p_c = n_c / N, each image exactly once).

    ``class-balanced``: the decoupling paper's class-aware sampler — classes visited in reshuffled
    cycles, 4 consecutive images per visit taken from the class's own reshuffled cycle — until N
    indices are drawn, so every non-empty class gets N / C images up to ±4. (Kang et al. keep the
    cycles' positions across epochs; here each epoch starts fresh cycles so that a checkpoint only
    needs the generator.)

    ``square-root``: p_c ∝ n_c^(1/2). N draws, each a class from p (one ``torch.multinomial`` with
    replacement) and then that class's next image from its own reshuffled cycle (a per-class
    permutation, reshuffled when exhausted): images of a class are drawn without replacement as far
    as possible — any two images of a class are drawn a number of times that differs by at most 1.

    ``progressive``: p_c(t) = (1 − t/T)·n_c/N + (t/T)·1/C with t/T = ``epoch`` / (``epochs`` − 1)
    (0 when ``epochs`` == 1; ``epoch`` counts from 0), interpolating from instance-balanced at the
    first epoch to class-balanced at the last. At t/T == 0 the order is exactly ``instance``'s and at
    t/T == 1 exactly ``class-balanced``'s (the same tensor for the same generator state); strictly
    between, the class-draw + per-class-cycle scheme of ``square-root`` with p(t).

    ``epoch`` and ``epochs`` only matter to ``progressive`` (0 <= ``epoch`` < ``epochs`` there).
    """
    import torch

    if sampler not in EPOCH_SAMPLERS:
        raise UserError(unknown("sampler", str(sampler), EPOCH_SAMPLERS))
    labels = torch.as_tensor(labels).cpu()
    n = int(labels.shape[0])
    if sampler == "progressive":
        epoch, epochs = int(epoch), int(epochs)
        if epochs < 1 or not 0 <= epoch < epochs:
            raise ValueError(f"progressive sampler: epoch {epoch} outside 0..{epochs - 1} (epochs {epochs})")
        if epochs == 1 or epoch == 0:
            sampler = "instance"
        elif epoch == epochs - 1:
            sampler = "class-balanced"
        else:
            labels = labels.to(torch.int64)
            counts = torch.bincount(labels, minlength=num_classes)[:num_classes].to(torch.float64)
            present = (counts > 0).to(torch.float64)
            a = epoch / (epochs - 1)
            probs = (1 - a) * counts / counts.sum() + a * present / present.sum()
            return _class_draws(labels, num_classes, probs, gen)
    if sampler == "square-root":
        labels = labels.to(torch.int64)
        counts = torch.bincount(labels, minlength=num_classes)[:num_classes].to(torch.float64)
        return _class_draws(labels, num_classes, counts.sqrt(), gen)
    if sampler == "instance":
        return torch.randperm(n, generator=gen)
    per_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    present = [c for c in range(num_classes) if per_class[c].numel()]
    queues = {c: per_class[c][torch.randperm(per_class[c].numel(), generator=gen)].tolist() for c in present}
    pos = {c: 0 for c in present}
    out: list[int] = []
    class_cycle: list[int] = []
    while len(out) < n:
        if not class_cycle:
            class_cycle = [present[i] for i in torch.randperm(len(present), generator=gen).tolist()]
        c = class_cycle.pop()
        for _ in range(4):
            if pos[c] == len(queues[c]):
                queues[c] = per_class[c][torch.randperm(per_class[c].numel(), generator=gen)].tolist()
                pos[c] = 0
            out.append(queues[c][pos[c]])
            pos[c] += 1
    return torch.tensor(out[:n], dtype=torch.int64)
