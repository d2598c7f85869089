"""Small CIFAR-10 / CIFAR-100 files in torchvision's exact on-disk format, for tests.

The layout and pickle keys follow ``torchvision/datasets/cifar.py`` (and the official archives):

* ``cifar-100-python/{train,test}``: dicts with ``data`` (N x 3072 uint8, channel-major: 1024 red,
  1024 green, 1024 blue values per image), ``fine_labels``, ``coarse_labels``, ``filenames`` and
  ``batch_label``; ``cifar-100-python/meta`` with ``fine_label_names`` and ``coarse_label_names``.
* ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``: dicts with ``data``, ``labels``,
  ``filenames``, ``batch_label``; ``batches.meta`` with ``label_names``, ``num_cases_per_batch``
  and ``num_vis``.

Pickles are written with protocol 2 (the official files are Python-2 pickles; torchvision reads
them with ``encoding="latin1"``, which also reads these).

Images are random but reproducible from ``seed``, and class-dependent (a per-class colour plus
noise) so a model can learn something from them. Labels are interleaved in a seeded random order,
as in the real files, so "the first n images of a class in file order" is a meaningful rule.

The per-class sizes may differ between classes (``per_class_train`` may be a sequence): the
long-tailed subset needs only n_c (+ validation) images of class c, so tests can write exactly
what a configuration needs instead of the full 500 / 5000 images per class.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Reference long-tailed training counts (docs/reference.md §1.1: LDAM-DRW's get_img_num_per_cls, int
# truncation, img_max 500 / 5000), shared by the tests of the counts and of ``study data``.
CIFAR100_IF100 = [
    500,
    477,
    455,
    434,
    415,
    396,
    378,
    361,
    344,
    328,
    314,
    299,
    286,
    273,
    260,
    248,
    237,
    226,
    216,
    206,
    197,
    188,
    179,
    171,
    163,
    156,
    149,
    142,
    135,
    129,
    123,
    118,
    112,
    107,
    102,
    98,
    93,
    89,
    85,
    81,
    77,
    74,
    70,
    67,
    64,
    61,
    58,
    56,
    53,
    51,
    48,
    46,
    44,
    42,
    40,
    38,
    36,
    35,
    33,
    32,
    30,
    29,
    27,
    26,
    25,
    24,
    23,
    22,
    21,
    20,
    19,
    18,
    17,
    16,
    15,
    15,
    14,
    13,
    13,
    12,
    12,
    11,
    11,
    10,
    10,
    9,
    9,
    8,
    8,
    7,
    7,
    7,
    6,
    6,
    6,
    6,
    5,
    5,
    5,
    5,
]
CIFAR10 = {  # imbalance factor -> per-class counts
    10: [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500],
    50: [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100],
    100: [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50],
    200: [5000, 2775, 1540, 854, 474, 263, 146, 81, 45, 25],
}
CIFAR10_TOTALS = [(10, 20431), (50, 13996), (100, 12406), (200, 11203)]  # (imbalance factor, sum of counts)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class CifarFiles:
    """What was written: the data root (pass it as ``data_dir``), the dataset folder, and the
    images and labels in file order (images as N x 3 x 32 x 32 uint8, like ``RawData``)."""

    root: Path
    folder: Path
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


def _per_class(n: int | Sequence[int], num_classes: int) -> np.ndarray:
    counts = np.full(num_classes, n, dtype=np.int64) if np.isscalar(n) else np.asarray(list(n), dtype=np.int64)
    if counts.shape != (num_classes,) or (counts < 0).any():
        raise ValueError(f"need {num_classes} non-negative per-class sizes, got {n!r}")
    return counts


def _images(rng: np.random.Generator, counts: np.ndarray, colours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels in a random interleaved order and N x 3072 uint8 images (class colour + noise)."""
    labels = np.repeat(np.arange(len(counts)), counts)
    labels = labels[rng.permutation(labels.size)]
    noise = np.frombuffer(rng.bytes(labels.size * 3072), dtype=np.uint8).reshape(-1, 3072) >> 2  # 0..63
    # channel-major rows: colour c of class y repeated over that channel's 1024 pixels
    data = noise + np.repeat(colours[labels], 1024, axis=1)  # <= 63 + 191: no uint8 overflow
    return labels.astype(np.int64), np.ascontiguousarray(data, dtype=np.uint8)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar100(
    root, per_class_train: int | Sequence[int] = 5, per_class_test: int | Sequence[int] = 2, seed: int = 0
) -> CifarFiles:
    """Write ``root/cifar-100-python/{train,test,meta}``; returns what was written."""
    C = 100
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 192, size=(C, 3), dtype=np.uint8)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, batch_label in (
        ("train", per_class_train, "training batch 1 of 1"),
        ("test", per_class_test, "testing batch 1 of 1"),
    ):
        y, data = _images(rng, _per_class(n, C), colours)
        _dump(
            folder / split,
            {
                "filenames": [f"generated_{split}_{i:06d}_class{int(c):02d}.png" for i, c in enumerate(y)],
                "batch_label": batch_label,
                "fine_labels": [int(c) for c in y],
                "coarse_labels": [int(c) // 5 for c in y],
                "data": data,
            },
        )
        out[split] = (data.reshape(-1, 3, 32, 32), y)
    _dump(
        folder / "meta",
        {
            "fine_label_names": [f"fine_{c:02d}" for c in range(C)],
            "coarse_label_names": [f"coarse_{c:02d}" for c in range(C // 5)],
        },
    )
    return CifarFiles(Path(root), folder, *out["train"], *out["test"])


def write_cifar10(
    root, per_class_train: int | Sequence[int] = 5, per_class_test: int | Sequence[int] = 2, seed: int = 0
) -> CifarFiles:
    """Write ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``; the training
    images are split over the five batches in file order. Returns what was written."""
    C = 10
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 192, size=(C, 3), dtype=np.uint8)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    ty, tdata = _images(rng, _per_class(per_class_train, C), colours)
    chunks = np.array_split(np.arange(ty.size), 5)
    for b, idx in enumerate(chunks, start=1):
        _dump(
            folder / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": [int(c) for c in ty[idx]],
                "data": tdata[idx],
                "filenames": [f"generated_train_{i:06d}_class{int(ty[i])}.png" for i in idx],
            },
        )
    vy, vdata = _images(rng, _per_class(per_class_test, C), colours)
    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [int(c) for c in vy],
            "data": vdata,
            "filenames": [f"generated_test_{i:06d}_class{int(c)}.png" for i, c in enumerate(vy)],
        },
    )
    _dump(
        folder / "batches.meta",
        {"num_cases_per_batch": int(max(len(c) for c in chunks)), "label_names": list(CIFAR10_NAMES), "num_vis": 3072},
    )
    return CifarFiles(Path(root), folder, tdata.reshape(-1, 3, 32, 32), ty, vdata.reshape(-1, 3, 32, 32), vy)
