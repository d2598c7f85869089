"""Small Fashion-MNIST files in the official IDX format, for tests.

The format (LeCun's MNIST page; Zalando's Fashion-MNIST uses it unchanged; torchvision's
``datasets/mnist.py::read_sn3_pascalvincent_tensor`` reads it):

* a 4-byte magic number ``0x00 0x00 TYPE NDIM``: TYPE 0x08 is unsigned byte, so images are
  ``0x00000803`` (3 dimensions) and labels ``0x00000801`` (1 dimension);
* NDIM big-endian 32-bit sizes (images: N, 28, 28; labels: N);
* the values, row-major, one byte each.

The official release ships the four files gzipped (``train-images-idx3-ubyte.gz``, ...);
torchvision's download extracts them next to the ``.gz`` files in ``ROOT/FashionMNIST/raw/``.

Images are random but reproducible from ``seed`` and class-dependent (a per-class grey level plus
noise, invariant to crops and flips), so a model can learn something from them. Labels are
interleaved in a seeded random order, as in the real files. Per-class sizes may differ between
classes, so a test writes only the images a configuration needs instead of 6,000 per class.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from study.testing.cifar_files import CifarFiles

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

# The Fashion-MNIST-LT counts at IF 100 (LDAM-DRW's int truncation) for n_max = 6000 - 20 (the honest
# protocol's default validation split), 6000 (no validation split) and the shipped spaces' 3000.
FASHION_IF100 = {
    5980: [5980, 3584, 2149, 1288, 772, 463, 277, 166, 99, 59],
    6000: [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60],
    3000: [3000, 1798, 1078, 646, 387, 232, 139, 83, 50, 30],
}


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte array (1 to 3 dimensions) in the IDX format."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    if not 1 <= a.ndim <= 3:
        raise ValueError(f"IDX unsigned-byte files hold 1 to 3 dimensions, got {a.ndim}")
    header = struct.pack(">I", 0x0800 | a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """Write ``array`` to ``path`` (``path.gz`` when ``gz``); returns the file written."""
    blob = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        # mtime=0: the same arrays give the same bytes
        path.write_bytes(gzip.compress(blob, mtime=0))
    else:
        path.write_bytes(blob)
    return path


# What was written: the same record as for CIFAR files (images here N x 1 x 28 x 28 uint8).
IdxFiles = CifarFiles


def _per_class(n: int | Sequence[int]) -> np.ndarray:
    counts = np.full(10, n, dtype=np.int64) if np.isscalar(n) else np.asarray(list(n), dtype=np.int64)
    if counts.shape != (10,) or (counts < 0).any():
        raise ValueError(f"need 10 non-negative per-class sizes, got {n!r}")
    return counts


def _images(rng: np.random.Generator, counts: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(10), counts)
    labels = labels[rng.permutation(labels.size)]
    noise = np.frombuffer(rng.bytes(labels.size * 784), dtype=np.uint8).reshape(-1, 28, 28) >> 2  # 0..63
    images = noise + levels[labels][:, None, None]  # <= 63 + 191: no uint8 overflow
    return np.ascontiguousarray(images, dtype=np.uint8), labels.astype(np.int64)


def write_fashion_mnist(
    root,
    per_class_train: int | Sequence[int] = 5,
    per_class_test: int | Sequence[int] = 2,
    seed: int = 0,
    gz: bool | Sequence[bool] = True,
    layout: str = "flat",
) -> IdxFiles:
    """Write the four Fashion-MNIST IDX files. ``layout``: ``flat`` puts them in ``root/``,
    ``torchvision`` in ``root/FashionMNIST/raw/``. ``gz``: one flag for all files or one per file
    (in the order of ``NAMES``)."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 192, size=10, dtype=np.uint8)
    root = Path(root)
    if layout not in ("flat", "torchvision"):
        raise ValueError(f"layout must be 'flat' or 'torchvision', got {layout!r}")
    folder = root if layout == "flat" else root / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    gzs = [gz] * 4 if isinstance(gz, bool) else list(gz)
    tx, ty = _images(rng, _per_class(per_class_train), levels)
    vx, vy = _images(rng, _per_class(per_class_test), levels)
    for name, arr, z in zip(NAMES, (tx, ty, vx, vy), gzs):
        write_idx(folder / name, arr, z)
    return IdxFiles(root, folder, tx[:, None], ty, vx[:, None], vy)
