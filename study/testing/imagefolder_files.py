"""Small image trees in Kang et al.'s split-file format (ImageNet-LT, Places-LT, iNaturalist 2018,
or a user's own lists), written with PIL so tests read them through the real decoding path.

A tree is a folder with the list files (``<prefix>_train.txt``, ``<prefix>_val.txt``,
``<prefix>_test.txt``; one ``relative/path label`` line per image) and the images under it, at the
paths the lists name. Images are small, of varying sizes, and mostly RGB JPEGs; the tree also holds
a grayscale JPEG, a CMYK JPEG and a PNG with an alpha channel, as real benchmark folders do. Each
class has its own base colour, so a model can learn something from a few epochs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_COUNTS = (40, 26, 17, 11, 8, 6, 5, 4, 3, 2, 2, 1)
"""A dozen classes with long-tailed training counts (class 0 the largest)."""


def _image(rng: np.random.Generator, label: int, num_classes: int, size: tuple[int, int]):
    from PIL import Image

    hue = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 29 + 160) % 256], dtype=np.float64)
    w, h = size
    noise = rng.normal(0, 25, (h, w, 3))
    arr = np.clip(hue[None, None, :] + noise, 0, 255).astype(np.uint8)
    # a class-dependent bar, so the images are not just colour
    pos = int((label + 0.5) / num_classes * h)
    arr[max(0, pos - 2) : pos + 2, :, :] = 255
    return Image.fromarray(arr, "RGB")


def make_lt_tree(
    root: Path,
    prefix: str = "ImageNet_LT",
    counts=DEFAULT_COUNTS,
    val_per_class: int = 3,
    test_per_class: int = 4,
    splits=("train", "val", "test"),
    seed: int = 0,
    min_side: int = 36,
    max_side: int = 80,
) -> dict[str, list[tuple[str, int]]]:
    """Write a tree under ``root``; returns the lines of each list as (relative path, label).

    ``train`` has ``counts[c]`` images of class c; ``val`` and ``test`` are balanced. Image paths
    follow ImageNet's layout (``train/<wnid>/<wnid>_<i>.JPEG``; ``val`` images live in ``train/``
    too, ``test`` images in ``val/``), as Kang et al.'s ImageNet-LT lists do. Three images are
    special: the first training image of class 1 is grayscale, that of class 2 is a CMYK JPEG and
    that of class 3 is an RGBA PNG."""

    root = Path(root)
    rng = np.random.default_rng(seed)
    num_classes = len(counts)
    per_split = {"train": list(counts), "val": [val_per_class] * num_classes, "test": [test_per_class] * num_classes}
    lines: dict[str, list[tuple[str, int]]] = {}
    for split in splits:
        folder = "val" if split == "test" else "train"
        out = []
        for c in range(num_classes):
            wnid = f"n{c:08d}"
            for i in range(per_split[split][c]):
                size = (int(rng.integers(min_side, max_side + 1)), int(rng.integers(min_side, max_side + 1)))
                img = _image(rng, c, num_classes, size)
                name = f"{wnid}_{split}{i}.JPEG"
                if split == "train" and i == 0 and c == 1:
                    img = img.convert("L")
                elif split == "train" and i == 0 and c == 2:
                    img = img.convert("CMYK")
                elif split == "train" and i == 0 and c == 3:
                    img = img.convert("RGBA")
                    name = f"{wnid}_{split}{i}.png"
                rel = f"{folder}/{wnid}/{name}"
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                if name.endswith(".png"):
                    img.save(path, format="PNG")
                else:
                    img.save(path, format="JPEG", quality=90)
                out.append((rel, c))
        # Kang's lists are not sorted by class; shuffle the lines so the loaders must not assume it
        order = rng.permutation(len(out))
        out = [out[i] for i in order]
        (root / f"{prefix}_{split}.txt").write_text("".join(f"{p} {y}\n" for p, y in out))
        lines[split] = out
    return lines


def open_modes(root: Path, lines: list[tuple[str, int]]) -> set[str]:
    """The PIL modes of the images a list names (to check a tree really has the special images)."""
    from PIL import Image

    modes = set()
    for rel, _ in lines:
        with Image.open(Path(root) / rel) as im:
            modes.add(im.mode)
    return modes
