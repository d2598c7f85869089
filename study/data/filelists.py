"""Datasets given as split files in Kang et al.'s format (Decoupling Representation and Classifier
for Long-Tailed Recognition, ICLR 2020): ImageNet-LT, Places-LT, iNaturalist 2018 and a user's
own long-tailed lists.

**Format.** One image per line, ``relative/path label``, the label an integer in [0, C). A line is
split on its *last* run of whitespace: everything before it is the path (Kang's lists never put
spaces in paths; a path that does contain whitespace is accepted only when that file exists, so
that ``a.jpg 3 5`` is reported as a line with an extra field rather than as a missing image
``a.jpg 3``). Leading and trailing whitespace and blank lines are ignored; line numbers in messages
count every physical line, starting at 1. Files are UTF-8.

**Layout.** ``--data-dir DIR`` holds the list files ``<Prefix>_train.txt``, ``<Prefix>_val.txt``
and ``<Prefix>_test.txt``, directly in ``DIR/`` or in ``DIR/<Prefix>/`` (the folder Kang et al.'s
repository keeps them in, ``data/<Prefix>/``), and the images at ``DIR/<relative path>``. The split
files are not shipped with this project: they are in ``data/ImageNet_LT/``, ``data/Places_LT/``
and ``data/iNaturalist18/`` of https://github.com/facebookresearch/classifier-balancing (whose
README says how the iNaturalist lists are generated; the ImageNet-LT and Places-LT lists come from
OLTR, https://github.com/zhmiao/OpenLongTailRecognition-OLTR, whose README links them on Google
Drive). ``split-files`` takes the user's own lists by explicit path instead.

**Protocol (which split selects epochs and hyperparameters).**

* ImageNet-LT and Places-LT ship a balanced validation list: selection uses it, and the test list
  is evaluated once per final configuration.
* iNaturalist 2018 has no test list; Kang et al. report on its ``val`` list, which is therefore our
  *test* set. Selecting on it would be selecting on the test set, so the honest protocol carves a
  validation split from the training list instead: per class, the last
  ``min(val_per_class, n_c - 1)`` images of that class in list order (every class keeps at least
  one training image; a class with a single image gives none). The rule is deterministic: no seed,
  the same images whatever else is configured. ``split-files`` without a val list is carved the
  same way.
* ``val_per_class = 0`` means no validation split at all (the ``wb-parity`` and
  ``test-selection`` protocols select on the test set).

Training counts, and therefore the Many / Medium / Few groups (> 100 / 20-100 / < 20 training
images, boundaries in Medium), are those of the images actually trained on, i.e. after carving.
Nothing here decodes an image or imports torch: this module reads the lists, checks that every
image they name exists, and returns paths and labels.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from study.config.datasets import FILE_DATASETS, KANG_REPO, OLTR_REPO, SPLITS, FileListSpec, get_file_spec  # noqa: F401
from study.errors import UserError

_FORMAT = "each line must be 'relative/path label' with an integer label (the label is the last field)"


@dataclass(frozen=True)
class FileLists:
    """The splits of a split-file dataset: image paths (relative to ``root``) and labels, in list order."""

    name: str
    """Registry name of the dataset."""
    root: Path
    """Folder the relative paths are resolved against (``--data-dir``)."""
    num_classes: int
    """C; every label is in [0, C) and every class has at least one training image. For the named
    benchmarks the largest label + 1 (their published C for the real lists; labels beyond it are
    errors), for split-files the class-names file's length, else the largest label + 1."""
    class_names: list[str] | None
    """Line i of the class-names file is class i; None when no file was given."""
    train_paths: np.ndarray
    """Relative paths of the training images (dtype object), after carving."""
    train_y: np.ndarray
    """Their labels (int64)."""
    val_paths: np.ndarray
    """Relative paths of the validation split: the val list or the carved images; empty when none."""
    val_y: np.ndarray
    """Their labels (int64)."""
    test_paths: np.ndarray
    """Relative paths of the test set (the val list for iNaturalist 2018)."""
    test_y: np.ndarray
    """Their labels (int64)."""
    train_counts: list[int]
    """Training images per class, after carving: what the groups and class priors are computed from."""
    list_train_counts: list[int]
    """Training images per class in the training list, before carving."""
    validation: str
    """Where the validation split comes from: ``val-list``, ``carved`` or ``none``."""
    val_per_class: int
    """The carving parameter (images per class at most); 0 when nothing is carved."""
    list_files: dict[str, str]
    """The list file read for each list (``train``, ``val``, ``test``), as absolute paths."""
    list_lines: dict[str, int]
    """Image lines in each list file."""
    official: bool
    """True only when every list has exactly the published line count (a count check, not a checksum)."""
    source: str
    """Where the lists were found (the folder, or the train list's folder for split-files)."""
    lists_hash: str
    """sha256 (first 16 hex digits) over the exact ``path label`` lines of train, val and test as
    returned (after carving): equal hashes mean identical splits."""

    @property
    def selection_split(self) -> str:
        """The split that selects epochs and hyperparameters: ``val``, or ``test`` when there is none."""
        return "val" if len(self.val_y) else "test"

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(paths, labels) of ``train``, ``val``, ``test`` or ``selection``."""
        if name == "selection":
            name = self.selection_split
        return {
            "train": (self.train_paths, self.train_y),
            "val": (self.val_paths, self.val_y),
            "test": (self.test_paths, self.test_y),
        }[name]


# --- reading one list --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _List:
    """One parsed list file; ``paths[i]`` is on the i-th non-blank line."""

    file: Path
    paths: list[str]
    labels: np.ndarray
    text: str

    def line_no(self, index: int) -> int:
        """The 1-based physical line of entry ``index`` (found again only on the error path, so that the
        common case of reading a list stores no line numbers)."""
        seen = -1
        for n, raw in enumerate(self.text.split("\n"), 1):
            if raw.strip():
                seen += 1
                if seen == index:
                    return n
        raise IndexError(index)


def _short(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _read_list(file: Path, root: Path, title: str) -> _List:
    """Parse one list file: syntax only (labels are range-checked once C is known)."""
    try:
        blob = file.read_bytes()
    except OSError as e:
        raise UserError(
            f"{title} list {file} cannot be read ({e.strerror or e}); check the path and its permissions"
        ) from None
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        line = blob[: e.start].count(b"\n") + 1
        raise UserError(f"{file}: line {line} is not UTF-8 text; {_FORMAT}") from None
    paths: list[str] = []
    labels: list[str] = []
    for n, raw in enumerate(text.split("\n"), 1):
        s = raw.strip()
        if not s:
            continue
        parts = s.rsplit(None, 1)
        if len(parts) != 2:
            raise UserError(f"{file}: line {n} '{_short(s)}' has no label; {_FORMAT}")
        paths.append(parts[0])
        labels.append(parts[1])
    if not paths:
        raise UserError(f"{file} is empty (no image lines); {_FORMAT}, one line per image")
    # One C-level scan over all labels instead of a check per line: plain ASCII digits everywhere is the
    # common case. Otherwise find the culprit (int() alone would accept '+3', '1_0' and non-ASCII digits).
    joined = "".join(labels)
    if not (joined.isascii() and joined.isdigit()):
        for i, lab in enumerate(labels):
            body = lab.removeprefix("-")
            if not (body.isascii() and body.isdigit()):
                lst = _List(file, paths, np.zeros(0, np.int64), text)
                raise UserError(
                    f"{file}: line {lst.line_no(i)}: label '{_short(lab, 20)}' is not an integer "
                    f"(in '{_short(paths[i] + ' ' + lab)}'); {_FORMAT}"
                )
    y = np.fromiter(map(int, labels), dtype=np.int64, count=len(labels))
    lst = _List(file, paths, y, text)
    # Paths with whitespace: only a line with an extra field produces one in Kang-style lists. Accept it only
    # when the file exists; one scan of the joined paths finds out whether there is any such line at all.
    joined = "\n".join(paths)
    if " " in joined or "\t" in joined:
        for i, p in enumerate(paths):
            if (" " in p or "\t" in p) and not os.path.isfile(os.path.join(root, p)):
                fields = len(p.split()) + 1
                raise UserError(
                    f"{file}: line {lst.line_no(i)} '{_short(p + ' ' + labels[i])}' has {fields} "
                    f"fields; {_FORMAT} (a path may contain spaces only when that file exists)"
                )
    return lst


def _read_class_names(file: str | os.PathLike) -> list[str]:
    path = Path(file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(
            f"class-names file {path} cannot be read ({e.strerror or e}); give a file with one "
            f"class name per line (line i = class i)"
        ) from None
    except UnicodeDecodeError:
        raise UserError(f"class-names file {path} is not UTF-8 text") from None
    names = [s.strip() for s in text.split("\n")]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise UserError(f"class-names file {path} is empty; give one class name per line (line i = class i)")
    for i, s in enumerate(names):
        if not s:
            raise UserError(
                f"class-names file {path}: line {i + 1} is blank; line i must name class i-1 "
                f"(one name per line, no gaps)"
            )
    seen: dict[str, int] = {}
    for i, s in enumerate(names):
        if s in seen:
            raise UserError(
                f"class-names file {path}: line {i + 1} repeats '{_short(s, 40)}' (line {seen[s] + 1}); "
                f"class names must be distinct"
            )
        seen[s] = i
    return names


# --- locating the files ------------------------------------------------------------------------------


def _where_to_get(spec: FileListSpec) -> str:
    if spec.prefix is None:
        return ""
    folder = {
        "ImageNet_LT": "data/ImageNet_LT/",
        "Places_LT": "data/Places_LT/",
        "iNaturalist18": "data/iNaturalist18/",
    }.get(spec.prefix, "data/")
    origin = (
        f", originally from OLTR ({OLTR_REPO}, Google Drive link in its README)"
        if spec.prefix in ("ImageNet_LT", "Places_LT")
        else ""
    )
    return (
        f"; the split files are not shipped with this project: get them from {folder} of Kang et al.'s "
        f"{KANG_REPO}{origin}"
    )


def _expected(spec: FileListSpec, root: Path) -> str:
    names = ", ".join(f"{spec.prefix}_{s}.txt" for s in spec.list_files)
    return (
        f"expected {names} in {root}/ or {root}/{spec.prefix}/, and the images they name at {root}/<path in the list>"
    )


def _find_lists(spec: FileListSpec, root: Path) -> tuple[dict[str, Path], Path]:
    """The list file of each of the dataset's lists, in ``root`` or ``root/<prefix>``."""
    folders = [root, root / spec.prefix]
    for folder in folders:
        found = {s: folder / f"{spec.prefix}_{s}.txt" for s in spec.list_files}
        have = [s for s, p in found.items() if p.is_file()]
        if len(have) == len(found):
            return found, folder
        if have:  # some of them here: name the missing ones rather than the whole layout
            missing = ", ".join(found[s].name for s in spec.list_files if s not in have)
            raise UserError(
                f"{spec.title}: {folder}/ has {', '.join(found[s].name for s in have)} but not "
                f"{missing}; {_expected(spec, root)}{_where_to_get(spec)}"
            )
    raise UserError(f"{spec.title} split files not found: {_expected(spec, root)}{_where_to_get(spec)}")


def _explicit_lists(lists: Mapping[str, str | os.PathLike | None] | None, root: Path) -> tuple[dict[str, Path], Path]:
    """``split-files``: the given list files. A relative path is looked up under ``root`` (``--data-dir``:
    what a search-space file names stays valid from any working directory), then in the working
    directory (what a path typed on the command line usually means)."""
    lists = {k: v for k, v in (lists or {}).items() if v}
    bad = set(lists) - set(SPLITS)
    if bad:
        raise UserError(f"split-files: unknown list '{min(bad)}'; give train, test and optionally val")
    need = [s for s in ("train", "test") if s not in lists]
    if need:
        raise UserError(
            f"split-files needs your own list files: give --train-list and --test-list (and "
            f"optionally --val-list; without it a validation split is carved from the training "
            f"list), each with one 'relative/path label' line per image; missing: "
            f"{', '.join('--' + s + '-list' for s in need)}"
        )
    found: dict[str, Path] = {}
    for s in SPLITS:
        if s not in lists:
            continue
        given = Path(lists[s]).expanduser()
        tried = [given] if given.is_absolute() else [root / given, given.absolute()]
        hit = next((p for p in tried if p.is_file()), None)
        if hit is None:
            raise UserError(
                f"split-files: {s} list {' or '.join(str(p) for p in tried)} not found; give the path "
                f"(absolute, or relative to --data-dir) of a file with one 'relative/path label' "
                f"line per image"
            )
        found[s] = hit
    return found, found["train"].parent


# --- checks ------------------------------------------------------------------------------------------


def _missing(root: Path, paths: list[str]) -> list[int]:
    """Indices of the entries that are not an existing regular file under ``root``, in order.

    One directory listing per folder instead of one ``stat`` per image: about 1.5x faster for
    iNaturalist's 462k images on a local disk (and far fewer round trips on a network file system);
    for ImageNet-LT, whose folders hold the whole of ImageNet, listing costs about as much as the
    stats it saves. A name the listing lacks is checked once more with ``stat``, so that what counts
    as present is exactly what ``open`` would find (case-insensitive or normalising file systems)."""
    base = str(root)
    by_dir: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_dir.setdefault(p.rpartition("/")[0], []).append(i)
    missing: list[int] = []
    for d, idx in by_dir.items():
        try:
            with os.scandir(os.path.join(base, d)) as it:
                names = {e.name for e in it if e.is_file()}
        except OSError:  # no such folder (or unreadable): every image in it is missing
            names = set()
        missing.extend(
            i
            for i in idx
            if paths[i].rpartition("/")[2] not in names and not os.path.isfile(os.path.join(base, paths[i]))
        )
    missing.sort()
    return missing


def _check_images(root: Path, parsed: dict[str, _List]) -> None:
    missing = {s: _missing(root, lst.paths) for s, lst in parsed.items()}
    total = sum(map(len, missing.values()))
    if not total:
        return
    split = next(s for s in parsed if missing[s])
    lst, i = parsed[split], missing[split][0]
    more = f", and {total - 1} more missing" if total > 1 else ""
    where = ", ".join(f"{len(v)} in {parsed[s].file.name}" for s, v in missing.items() if v)
    raise UserError(
        f"{lst.file}: line {lst.line_no(i)} names {lst.paths[i]}, which is not an image file under "
        f"{root}{more} ({where}); put the images at {root}/<path in the list>, or pass the "
        f"--data-dir that holds them"
    )


def _check_disjoint(parsed: dict[str, _List]) -> None:
    """A test image that is also trained on or selected on would inflate the reported numbers."""
    names = list(parsed)
    for a_i, a in enumerate(names):
        seen = {p: i for i, p in enumerate(parsed[a].paths)}
        for b in names[a_i + 1 :]:
            shared = [i for i, p in enumerate(parsed[b].paths) if p in seen]
            if shared:
                j = shared[0]
                p = parsed[b].paths[j]
                more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
                raise UserError(
                    f"{parsed[b].file}: line {parsed[b].line_no(j)} names {p}, which is also on line "
                    f"{parsed[a].line_no(seen[p])} of {parsed[a].file}{more}; the {a} and {b} lists "
                    f"must not share images"
                )


def carve_validation(labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """Boolean mask over a training list: True for the images carved into the validation split.

    Per class, the last ``min(per_class, n_c - 1)`` images of that class in list order, so that every
    class keeps at least one training image (a class with one image gives none). Deterministic."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    take = np.minimum(per_class, np.maximum(counts - 1, 0))
    order = np.argsort(labels, kind="stable")  # by class, list order kept within a class
    starts = np.cumsum(counts) - counts
    rank = np.arange(labels.size) - np.repeat(starts, counts)  # position of each image within its class
    sorted_labels = labels[order]
    mask = np.zeros(labels.size, dtype=bool)
    mask[order[rank >= (counts - take)[sorted_labels]]] = True
    return mask


def lists_hash(splits: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """sha256 (16 hex digits) over the ``path label`` lines of each split, split names and sizes included."""
    h = hashlib.sha256()
    for name in SPLITS:
        paths, y = splits[name]
        h.update(f"[{name} {len(y)}]\n".encode())
        h.update("".join(f"{p} {label}\n" for p, label in zip(paths, y.tolist())).encode())
    return h.hexdigest()[:16]


# --- the loader --------------------------------------------------------------------------------------


def load_file_lists(
    name: str,
    data_dir: str | os.PathLike | None,
    *,
    val_per_class: int = 20,
    carve: bool | None = None,
    lists: Mapping[str, str | os.PathLike | None] | None = None,
    class_names: str | os.PathLike | None = None,
    check_images: bool = True,
) -> FileLists:
    """Read, check and split a dataset given as Kang-style split files.

    ``name``: a key of :data:`FILE_DATASETS`. ``data_dir``: the folder holding the images (and, for
    the named benchmarks, the lists, in it or in ``data_dir/<Prefix>/``). ``lists``: for
    ``split-files`` only, ``{"train": path, "test": path, "val": path or None}`` (a relative path is
    looked up under ``data_dir``, then in the working directory). ``class_names``:
    a file with one name per line (line i = class i); for ``split-files`` it fixes C, otherwise C is
    the largest label + 1. ``val_per_class``: 0 for no validation split at all; otherwise, when
    carving, the most images per class to carve. ``carve``: None carves exactly when the dataset has
    no validation list (iNaturalist 2018; split-files without a val list); True carves even when there
    is one (its val list is then not used). ``check_images``: check that every listed image exists
    (one directory listing per folder; False skips it, except for paths containing whitespace, see
    the module docstring).

    Every problem is a :class:`UserError` naming the file, line and what to do, raised before
    anything is returned: unreadable or empty lists, malformed lines, labels outside [0, C), a class
    without training images, images shared between lists, and missing images (the first one, plus
    how many more)."""
    spec = get_file_spec(name)
    if data_dir is None or str(data_dir) == "":
        where = _expected(spec, Path("DIR")) if spec.prefix else "DIR/<path in the lists>"
        raise UserError(
            f"{spec.name} reads its split files and images from disk: pass --data-dir DIR (or set "
            f"STUDY_DATA_DIR); {where}{_where_to_get(spec)}"
        )
    root = Path(data_dir).expanduser().absolute()
    if not root.is_dir():
        what = _expected(spec, root) if spec.prefix else f"the images at {root}/<path in the lists>"
        raise UserError(f"{spec.title}: --data-dir {root} is not a folder; {what}{_where_to_get(spec)}")
    if val_per_class < 0:
        raise UserError(f"val_per_class {val_per_class} is negative; use 0 (no validation split) or more")
    if spec.prefix is None:
        files, source = _explicit_lists(lists, root)
    else:
        if lists:
            raise UserError(
                f"{spec.name} reads {spec.prefix}_*.txt from --data-dir; explicit list files are for split-files"
            )
        files, source = _find_lists(spec, root)

    parsed = {s: _read_list(p, root, spec.title) for s, p in files.items()}

    names = _read_class_names(class_names) if class_names is not None else None
    if spec.num_classes is not None:
        C = spec.num_classes
        if names is not None and len(names) != C:
            raise UserError(f"class-names file {class_names} has {len(names)} names; {spec.title} has {C} classes")
        how = f"{spec.title} has {C} classes"
    elif names is not None:
        C = len(names)
        how = f"{class_names} names {C} classes"
    else:
        C = max(1, max(int(lst.labels.max()) for lst in parsed.values()) + 1)
        how = "without a class-names file C is the largest label + 1"
    for lst in parsed.values():
        bad = np.flatnonzero((lst.labels < 0) | (lst.labels >= C))
        if bad.size:
            i = int(bad[0])
            more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
            raise UserError(
                f"{lst.file}: line {lst.line_no(i)}: label {int(lst.labels[i])} is outside the valid "
                f"range 0..{C - 1} ({how}){more}; labels must be class indices in [0, {C})"
            )

    if spec.num_classes is not None and names is None:
        # Labels are checked against the benchmark's C; the classes trained are those the lists use,
        # 0 .. largest label (all C for the real lists): a smaller tree in the same format (a subset,
        # a test fixture) is then a C'-class problem instead of one with empty classes, whose prior
        # of zero would break logit adjustment and class-balanced weights.
        C = max(1, max(int(lst.labels.max()) for lst in parsed.values() if lst.labels.size) + 1)
    list_counts = np.bincount(parsed["train"].labels, minlength=C)
    empty = np.flatnonzero(list_counts == 0)
    if empty.size:
        c = int(empty[0])
        label = f"class {c}" + (f" ('{_short(names[c], 40)}')" if names else "")
        hint = (
            f"these are not the {spec.title} lists (every class has training images there)"
            if spec.prefix
            else "every class needs at least one training image"
        )
        raise UserError(
            f"{parsed['train'].file}: {label} has no training image ({empty.size} of {C} classes have "
            f"none); {hint}; remove the class or add its images"
            + ("" if spec.prefix else " (C comes from the class names, else the largest label + 1)")
        )
    _check_disjoint(parsed)
    if check_images:
        _check_images(root, parsed)

    has_val_list = spec.val_list is not None and spec.val_list in parsed
    if carve is None:
        carve = not has_val_list
    if val_per_class == 0:
        carve, validation = False, "none"
    elif carve:
        validation = "carved"
    elif has_val_list:
        validation = "val-list"
    else:
        raise UserError(
            f"{spec.title} has no validation list (its {spec.test_list} list is the test set): carve "
            f"a validation split from the training list, or use val_per_class 0 (no validation "
            f"split; selection on the test set)"
        )

    train, test = parsed["train"], parsed[spec.test_list]
    tp = np.array(train.paths, dtype=object)
    ty = train.labels
    if validation == "carved":
        mask = carve_validation(ty, C, val_per_class)
        vp, vy, tp, ty = tp[mask], ty[mask], tp[~mask], ty[~mask]
    elif validation == "val-list":
        vp, vy = np.array(parsed["val"].paths, dtype=object), parsed["val"].labels
    else:
        vp, vy = np.zeros(0, dtype=object), np.zeros(0, dtype=np.int64)
    sp, sy = np.array(test.paths, dtype=object), test.labels
    splits = {"train": (tp, ty), "val": (vp, vy), "test": (sp, sy)}
    lines = {s: len(lst.paths) for s, lst in parsed.items()}
    official = bool(spec.official_lines) and all(lines.get(s) == n for s, n in spec.official_lines.items())
    return FileLists(
        name=spec.name,
        root=root,
        num_classes=C,
        class_names=names,
        train_paths=tp,
        train_y=ty,
        val_paths=vp,
        val_y=vy,
        test_paths=sp,
        test_y=sy,
        train_counts=np.bincount(ty, minlength=C).tolist(),
        list_train_counts=list_counts.tolist(),
        validation=validation,
        val_per_class=val_per_class if validation == "carved" else 0,
        list_files={s: str(p) for s, p in files.items()},
        list_lines=lines,
        official=official,
        source=str(source),
        lists_hash=lists_hash(splits),
    )


def _uniform(counts: list[int]) -> int | None:
    return counts[0] if counts and all(n == counts[0] for n in counts) else None


def describe_file_dataset(
    name: str,
    data_dir: str | os.PathLike | None,
    *,
    many_threshold: int | None = None,
    few_threshold: int | None = None,
    **load_kwargs,
) -> dict:
    """Counts, split sizes and groups of a split-file dataset, for ``study data`` (JSON-ready).

    ``load_kwargs`` go to :func:`load_file_lists`. The keys shared with the synthetic datasets'
    ``study.data.longtail.describe`` mean the same: ``train_counts`` (after carving), ``total_train``,
    ``num_classes``, ``thresholds``, ``groups``, ``val_per_class`` / ``test_per_class`` (images per
    class when that number is the same for every class, else null; see ``val_counts`` /
    ``test_counts``), ``imbalance_factor`` (largest / smallest training count) and ``n_max``.
    ``official_files`` is true only when every list has its published line count."""
    from study.config.groups import shot_groups

    spec = get_file_spec(name)
    fl = load_file_lists(name, data_dir, **load_kwargs)
    many = spec.many_threshold if many_threshold is None else many_threshold
    few = spec.few_threshold if few_threshold is None else few_threshold
    if many < 0 or few < 0:
        raise UserError(f"group thresholds must be non-negative (many {many}, few {few})")
    if many < few:
        raise UserError(f"few_threshold {few} is larger than many_threshold {many}")
    C = fl.num_classes
    val_counts = np.bincount(fl.val_y, minlength=C).tolist()
    test_counts = np.bincount(fl.test_y, minlength=C).tolist()
    groups = shot_groups(fl.train_counts, many, few)
    note = spec.note
    if not fl.official:
        published = " / ".join(f"{s} {n:,}" for s, n in spec.official_lines.items())
        found = " / ".join(f"{s} {n:,}" for s, n in fl.list_lines.items())
        why = f" (line counts {found}; the published {spec.title} lists have {published})" if published else ""
        note = f"not the official split files{why}" + (f"; {note}" if note else "")
    return {
        "dataset": spec.name,
        "title": spec.title,
        "num_classes": C,
        "class_names": fl.class_names is not None,
        "imbalance_factor": max(fl.train_counts) / min(fl.train_counts),
        "n_max": max(fl.train_counts),
        "train_counts": fl.train_counts,
        "total_train": int(sum(fl.train_counts)),
        "val_per_class": _uniform(val_counts) if fl.validation != "none" else 0,
        "test_per_class": _uniform(test_counts),
        "val_counts": val_counts,
        "test_counts": test_counts,
        "total_val": len(fl.val_y),
        "total_test": len(fl.test_y),
        "validation": fl.validation,
        "carve_per_class": fl.val_per_class,
        "list_train_counts": fl.list_train_counts,
        "selection_split": fl.selection_split,
        "test_list": spec.test_list,
        "thresholds": {"many_gt": many, "few_lt": few},
        "groups": {g: int((groups == g).sum()) for g in ("many", "medium", "few")},
        "official_files": fl.official,
        "list_lines": fl.list_lines,
        "official_lines": dict(spec.official_lines),
        "list_files": fl.list_files,
        "source": fl.source,
        "data_dir": str(fl.root),
        "lists_hash": fl.lists_hash,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "color_jitter": spec.color_jitter,
        "note": note,
    }
