"""The in-memory datasets' official files: CIFAR-10/100 (torchvision's reader), Fashion-MNIST (IDX
files) and scikit-learn's bundled digits, read as balanced train/test pools of uint8 images in file
order (:class:`RawData`). ``LOADERS`` maps each dataset of the catalog (``study.config.datasets``)
to its reader; ``study.data.longtail`` draws the long-tailed subset from the pool.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import socket
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from study.config.datasets import DEFAULT_DATA_DIR, DIGITS_TEST_PER_CLASS
from study.errors import UserError


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
            except Exception as e:  # noqa: BLE001 - network trouble mid-download: fall through to the clear error
                print(f"download of {cls.url} failed: {e}")
            missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(
                f"CIFAR-{num_classes} files not found: {folder / missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f"; download {cls.url}, extract it so that {folder}/ holds {', '.join(names)},"
                f" or pass --data-dir DIR pointing at the folder that contains {cls.base_folder}/"
            )

        official = all(
            check_integrity(str(folder / n), md5) for n, md5 in cls.train_list + cls.test_list
        ) and check_integrity(str(folder / cls.meta["filename"]), cls.meta["md5"])

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
        except (
            pickle.UnpicklingError,
            EOFError,
            KeyError,
            ValueError,
            TypeError,
            IndexError,
            AttributeError,
            OSError,
        ) as e:
            raise UserError(
                f"CIFAR-{num_classes} files in {folder} are truncated or corrupt "
                f"({type(e).__name__}: {str(e)[:80]}); delete the folder and extract "
                f"{archive} again"
            ) from None

        def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
            x = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2))
            y = np.asarray(ds.targets, dtype=np.int64)
            return x, y

        tx, ty = arrays(train)
        vx, vy = arrays(test)
        for split, y in (("train", ty), ("test", vy)):
            if y.size == 0 or y.min() < 0 or y.max() >= num_classes:
                raise UserError(
                    f"CIFAR-{num_classes} {split} labels in {folder} are outside 0..{num_classes - 1}; "
                    f"the files are not CIFAR-{num_classes} (re-extract {archive})"
                )
        return RawData(tx, ty, vx, vy, official=official, source=str(folder))

    return load


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
    return RawData(
        x[pool_idx], y[pool_idx], x[test_idx], y[test_idx], official=None, source="sklearn.datasets.load_digits"
    )


FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
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
        except Exception as e:  # noqa: BLE001 - network trouble mid-download: fall through to the clear error
            print(f"download of Fashion-MNIST from {FASHION_MNIST_HOST} failed: {e}")
        folder, files = find()
    wanted = ", ".join(f"{n}[.gz]" for n in FASHION_MNIST_FILES)
    if files and len(files) < len(FASHION_MNIST_FILES):  # a folder holds part of them: say what is missing
        missing = ", ".join(f"{n}[.gz]" for n in FASHION_MNIST_FILES if n not in files)
        raise UserError(
            f"Fashion-MNIST files incomplete: {folder}/ lacks {missing}; put all four files there, "
            f"run `apt-get install dataset-fashion-mnist`, or pass --data-dir DIR for a folder "
            f"holding {wanted}"
        )
    if not files:
        raise UserError(
            f"Fashion-MNIST files not found in {', '.join(f'{d}/' for d in folders[:-1])} or {folders[-1]}/"
            f"; run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --data-dir DIR "
            f"for a folder holding {wanted} (or DIR/FashionMNIST/raw/, torchvision's layout)"
        )

    arrays, official = {}, True
    for n, path in files.items():
        try:
            arr, md5 = _read_idx(path, images="images" in n)
        except (
            AssertionError,
            TypeError,
            ValueError,
            RuntimeError,
            KeyError,
            IndexError,
            OSError,
            EOFError,
            zlib.error,
        ) as e:
            raise UserError(
                f"Fashion-MNIST file {path} is truncated or corrupt ({type(e).__name__}: "
                f"{str(e)[:80]}); reinstall dataset-fashion-mnist or fetch the official files "
                f"again"
            ) from None
        arrays[n] = arr
        official = official and md5 == FASHION_MNIST_MD5[n]
    out = []
    for split in ("train", "t10k"):
        x, y = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"].astype(np.int64)
        if x.shape[1:] != (28, 28):
            raise UserError(
                f"Fashion-MNIST {split} images in {folder} are {x.shape[1]}x{x.shape[2]}, not 28x28; "
                "the files are not Fashion-MNIST"
            )
        if len(x) != len(y):
            raise UserError(f"Fashion-MNIST {split} files in {folder} disagree: {len(x)} images but {len(y)} labels")
        if y.size == 0 or y.min() < 0 or y.max() >= 10:
            raise UserError(
                f"Fashion-MNIST {split} labels in {folder} are outside 0..9; the files are not Fashion-MNIST"
            )
        out += [np.ascontiguousarray(x[:, None], dtype=np.uint8), y]
    return RawData(*out, official=official, source=str(folder))


LOADERS: dict[str, Callable[[str | os.PathLike | None, bool], RawData]] = {
    "cifar10-lt": _cifar_loader(10),
    "cifar100-lt": _cifar_loader(100),
    "fashion-mnist-lt": _load_fashion_mnist,
    "digits-lt": _load_digits,
}
"""Dataset name -> ``load(data_dir, download) -> RawData`` for the datasets held in memory."""
