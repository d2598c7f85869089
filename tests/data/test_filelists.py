"""Datasets in Kang et al.'s split-file format (study.data.filelists): counts read from the lists, the
iNaturalist carve rule, split-files with class names, a full-size list, and every bad input through
the real ``study data`` command (exit code 2, one line, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from study.data.filelists import FILE_DATASETS, carve_validation, load_file_lists
from study.errors import UserError
from study.testing.imagefolder_files import make_lt_tree

REPO = Path(__file__).resolve().parents[2]

# ImageNet-LT has 1000 classes and every one must have a training image, so the tree has all of them:
# a few large classes straddling the group boundaries (> 100 many, 20..100 medium, < 20 few), the rest 1.
INET_COUNTS = [150, 101, 100, 60, 20, 19, 5] + [1] * 993
INET_GROUPS = {"many": 2, "medium": 3, "few": 995}
# iNaturalist 2018: 8142 classes; the first five exercise every case of min(val_per_class, n_c - 1).
INAT_COUNTS = [30, 21, 5, 2, 1] + [1] * 8137


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    """An ImageNet-LT-format tree (lists in DIR/); returns (root, lines per split). Do not modify it."""
    root = tmp_path_factory.mktemp("imagenet-lt")
    lines = make_lt_tree(
        root, prefix="ImageNet_LT", counts=INET_COUNTS, val_per_class=1, test_per_class=2, min_side=8, max_side=12
    )
    return root, lines


@pytest.fixture(scope="module")
def inat(tmp_path_factory):
    """An iNaturalist18-format tree: a train and a val list only. Do not modify it."""
    root = tmp_path_factory.mktemp("inat2018")
    lines = make_lt_tree(
        root,
        prefix="iNaturalist18",
        counts=INAT_COUNTS,
        val_per_class=1,
        splits=("train", "val"),
        min_side=8,
        max_side=8,
    )
    return root, lines


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 12-class tree of the user's own lists (prefix ``mine``), with a class-names file."""
    root = tmp_path_factory.mktemp("split-files")
    lines = make_lt_tree(root, prefix="mine")
    (root / "names.txt").write_text("".join(f"class {c}\n" for c in range(12)))
    return root, lines


def study(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m study ARGS``; no STUDY_DATA_DIR from the caller, wide output so lines do not wrap."""
    env = {k: v for k, v in os.environ.items() if k != "STUDY_DATA_DIR"}
    env.update({"COLUMNS": "250", **(env_extra or {})})
    return subprocess.run(
        [sys.executable, "-m", "study", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def data_json(*args: str) -> dict:
    r = study("data", *args, "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def pairs(paths, labels) -> list[tuple[str, int]]:
    return list(zip(paths.tolist(), labels.tolist()))


def with_lists(src: Path, dst: Path, prefix: str, edit: dict | None = None) -> Path:
    """A data dir ``dst`` with the image folders of ``src`` (symlinked) and copies of its lists, the
    list ``split`` replaced by ``edit[split]`` (a function of its lines, or None to leave it out)."""
    dst.mkdir(parents=True, exist_ok=True)
    for folder in ("train", "val"):
        if (src / folder).is_dir():
            (dst / folder).symlink_to(src / folder, target_is_directory=True)
    edit = edit or {}
    for split in ("train", "val", "test"):
        f = src / f"{prefix}_{split}.txt"
        if not f.exists():
            continue
        lines = f.read_text().splitlines(keepends=True)
        if split in edit:
            if edit[split] is None:
                continue
            lines = edit[split](lines)
        (dst / f.name).write_text("".join(lines))
    return dst


# --- counts from the lists ---------------------------------------------------------------------------


def test_imagenet_lt_counts_per_class_and_per_split_are_the_lists(inet, tmp_path):
    root, lines = inet
    fl = load_file_lists("imagenet-lt", root)
    assert fl.num_classes == 1000 and fl.class_names is None
    assert fl.train_counts == INET_COUNTS == fl.list_train_counts
    # every split is its list, line for line, in list order (train not carved: the val list selects)
    assert pairs(fl.train_paths, fl.train_y) == lines["train"]
    assert pairs(fl.val_paths, fl.val_y) == lines["val"]
    assert pairs(fl.test_paths, fl.test_y) == lines["test"]
    assert np.bincount(fl.val_y, minlength=1000).tolist() == [1] * 1000
    assert np.bincount(fl.test_y, minlength=1000).tolist() == [2] * 1000
    assert fl.train_y.dtype == np.int64 and fl.train_paths.dtype == object
    assert fl.validation == "val-list" and fl.selection_split == "val" and fl.val_per_class == 0
    assert fl.list_lines == {"train": sum(INET_COUNTS), "val": 1000, "test": 2000}
    assert fl.official is False
    # the lists may also sit in DIR/ImageNet_LT/ (the images stay at DIR/<path>): same splits, same hash
    nested = with_lists(root, tmp_path / "nested", "ImageNet_LT", edit={s: None for s in ("train", "val", "test")})
    (nested / "ImageNet_LT").mkdir()
    for split in ("train", "val", "test"):
        name = f"ImageNet_LT_{split}.txt"
        (nested / "ImageNet_LT" / name).write_text((root / name).read_text())
    again = load_file_lists("imagenet-lt", nested)
    assert again.lists_hash == fl.lists_hash and again.source == str(nested / "ImageNet_LT")
    # no validation split at all (wb-parity / test-selection): selection falls to the test set
    none = load_file_lists("imagenet-lt", root, val_per_class=0)
    assert len(none.val_y) == 0 and none.selection_split == "test" and none.train_counts == INET_COUNTS
    assert none.lists_hash != fl.lists_hash


def test_study_data_imagenet_lt_json_reports_the_lists_counts_and_groups(inet):
    root, lines = inet
    info = data_json("imagenet-lt", "--data-dir", str(root))
    assert info["dataset"] == "imagenet-lt" and info["num_classes"] == 1000
    assert info["train_counts"] == INET_COUNTS and info["total_train"] == sum(INET_COUNTS) == len(lines["train"])
    assert info["val_counts"] == [1] * 1000 and info["total_val"] == 1000 and info["val_per_class"] == 1
    assert info["test_counts"] == [2] * 1000 and info["total_test"] == 2000 and info["test_per_class"] == 2
    assert info["groups"] == INET_GROUPS
    assert info["thresholds"] == {"many_gt": 100, "few_lt": 20}
    assert info["official_files"] is False and "not the official split files" in info["note"]
    assert info["protocol"] == "honest" and info["selection_split"] == "val" and info["validation"] == "val-list"
    assert info["list_lines"] == {"train": sum(INET_COUNTS), "val": 1000, "test": 2000}
    assert info["official_lines"] == {"train": 115846, "val": 20000, "test": 50000}
    assert info["n_max"] == 150 and info["imbalance_factor"] == 150.0
    # the protocols without a validation split
    parity = data_json("imagenet-lt", "--data-dir", str(root), "--protocol", "test-selection")
    assert parity["total_val"] == 0 and parity["selection_split"] == "test" and parity["val_per_class"] == 0
    assert parity["train_counts"] == INET_COUNTS
    # the table says the same
    r = study("data", "imagenet-lt", "--data-dir", str(root))
    assert r.returncode == 0, r.stderr
    assert "not the official split files" in r.stdout
    assert "groups: many (>100) 2, medium (20-100) 3, few (<20) 995 classes" in r.stdout
    assert f"total train {sum(INET_COUNTS)}  |  val 1/class, 1000  |  test (test list) 2/class, 2000" in r.stdout


def test_official_only_when_every_list_has_its_published_line_count(tmp_path):
    spec = FILE_DATASETS["places-lt"]
    for split, n in spec.official_lines.items():
        (tmp_path / f"Places_LT_{split}.txt").write_text(
            "".join(f"{split}/c{i % 365}/{i:06d}.jpg {i % 365}\n" for i in range(n))
        )
    fl = load_file_lists("places-lt", tmp_path, check_images=False)
    assert fl.official is True and fl.list_lines == dict(spec.official_lines)
    test = tmp_path / "Places_LT_test.txt"
    test.write_text("".join(test.read_text().splitlines(keepends=True)[:-1]))  # one line short
    assert load_file_lists("places-lt", tmp_path, check_images=False).official is False


# --- the iNaturalist carve rule ----------------------------------------------------------------------


def test_carve_validation_takes_the_last_images_of_each_class_and_leaves_one():
    labels = np.array([0, 0, 1, 0, 2, 1, 0])
    # class 0 (rows 0, 1, 3, 6): the last two; class 1 (2, 5): one of two; class 2 (4): none of one
    assert carve_validation(labels, 3, 2).tolist() == [False, False, False, True, False, True, True]
    assert carve_validation(labels, 3, 0).tolist() == [False] * 7
    assert carve_validation(labels, 4, 99).tolist() == [False, True, False, True, False, True, True]


def test_inat_carve_rule_keeps_a_training_image_per_class_disjoint_and_deterministic(inat):
    root, lines = inat
    fl = load_file_lists("inat2018", root, val_per_class=20)
    assert fl.num_classes == 8142 and fl.validation == "carved" and fl.selection_split == "val"
    assert fl.val_per_class == 20
    # the test set is the val list, line for line
    assert pairs(fl.test_paths, fl.test_y) == lines["val"]
    n = np.array(INAT_COUNTS)
    take = np.minimum(20, n - 1)
    assert fl.list_train_counts == INAT_COUNTS
    assert fl.train_counts == (n - take).tolist()
    assert min(fl.train_counts) >= 1
    assert np.bincount(fl.val_y, minlength=8142).tolist() == take.tolist()
    assert fl.train_counts[:5] == [10, 1, 1, 1, 1]
    train, val = pairs(fl.train_paths, fl.train_y), pairs(fl.val_paths, fl.val_y)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(lines["train"])
    # the carved images are the last ones of their class in list order; both splits keep list order
    for c in range(5):
        of_c = [line for line in lines["train"] if line[1] == c]
        k = int(take[c])
        assert [v for v in val if v[1] == c] == (of_c[len(of_c) - k :] if k else [])
        assert [t for t in train if t[1] == c] == of_c[: len(of_c) - k]
    kept = set(train)
    assert train == [line for line in lines["train"] if line in kept]
    again = load_file_lists("inat2018", root, val_per_class=20)
    assert again.lists_hash == fl.lists_hash
    assert pairs(again.val_paths, again.val_y) == val and pairs(again.train_paths, again.train_y) == train
    # no validation split: the whole list trains; iNat has no val list to fall back on
    whole = load_file_lists("inat2018", root, val_per_class=0)
    assert pairs(whole.train_paths, whole.train_y) == lines["train"] and len(whole.val_y) == 0
    with pytest.raises(UserError, match="no validation list"):
        load_file_lists("inat2018", root, carve=False)


def test_study_data_inat_tests_on_the_val_list_and_selects_on_the_carved_split(inat):
    root, lines = inat
    info = data_json("inat2018", "--data-dir", str(root), "--val-per-class", "4")
    take = np.minimum(4, np.array(INAT_COUNTS) - 1)
    assert info["validation"] == "carved" and info["carve_per_class"] == 4 and info["selection_split"] == "val"
    assert info["test_list"] == "val" and info["total_test"] == len(lines["val"]) == 8142
    assert info["train_counts"] == (np.array(INAT_COUNTS) - take).tolist()
    assert info["total_val"] == int(take.sum()) == 4 + 4 + 4 + 1
    assert info["val_per_class"] is None  # not the same for every class
    assert info["official_files"] is False and info["color_jitter"] is False
    assert info["mean"] == [0.466, 0.471, 0.380]


# --- split-files ---------------------------------------------------------------------------------------


def test_split_files_with_class_names(small, tmp_path):
    root, lines = small
    lists = {s: root / f"mine_{s}.txt" for s in ("train", "val", "test")}
    fl = load_file_lists("split-files", root, lists=lists, class_names=root / "names.txt")
    assert fl.num_classes == 12 and fl.class_names == [f"class {c}" for c in range(12)]
    assert pairs(fl.train_paths, fl.train_y) == lines["train"] and fl.validation == "val-list"
    assert pairs(fl.test_paths, fl.test_y) == lines["test"]
    assert fl.official is False
    # without a val list the validation split is carved as for iNaturalist
    carved = load_file_lists(
        "split-files", root, lists={"train": lists["train"], "test": lists["test"]}, val_per_class=3
    )
    counts = np.bincount([y for _, y in lines["train"]], minlength=12)
    assert carved.validation == "carved" and carved.train_counts == (counts - np.minimum(3, counts - 1)).tolist()
    # C from the names: a name without training images is an error, so is a label beyond the names
    (tmp_path / "13.txt").write_text("".join(f"c{c}\n" for c in range(13)))
    with pytest.raises(UserError, match=r"class 12 \('c12'\) has no training image"):
        load_file_lists("split-files", root, lists=lists, class_names=tmp_path / "13.txt")
    (tmp_path / "11.txt").write_text("".join(f"c{c}\n" for c in range(11)))
    with pytest.raises(UserError, match=r"label 11 is outside the valid range 0\.\.10 .*11\.txt names 11 classes"):
        load_file_lists("split-files", root, lists=lists, class_names=tmp_path / "11.txt")
    # through the CLI, list paths relative to --data-dir
    info = data_json(
        "split-files",
        "--data-dir",
        str(root),
        "--train-list",
        "mine_train.txt",
        "--val-list",
        "mine_val.txt",
        "--test-list",
        "mine_test.txt",
        "--class-names",
        str(root / "names.txt"),
    )
    assert info["num_classes"] == 12 and info["class_names"] is True and info["train_counts"] == counts.tolist()
    assert info["official_files"] is False and info["val_per_class"] == 3 and info["test_per_class"] == 4


def test_lists_tolerate_crlf_tabs_blank_lines_and_no_final_newline(small, tmp_path):
    root, lines = small
    text = "\r\n".join(f"  {p}\t{y} " if i % 2 else f"{p} {y}" for i, (p, y) in enumerate(lines["train"]))
    (tmp_path / "train.txt").write_text("\n" + text.replace("\r\n", "\r\n\r\n", 1))  # blank lines, no final \n
    fl = load_file_lists(
        "split-files", root, lists={"train": tmp_path / "train.txt", "test": root / "mine_test.txt"}, val_per_class=0
    )
    assert pairs(fl.train_paths, fl.train_y) == lines["train"]


# --- a full-size list ---------------------------------------------------------------------------------


def test_full_size_inat_list_parses_exactly(small, tmp_path):
    """437,513 training and 24,426 val lines (iNaturalist 2018's counts) naming a handful of real images."""
    root, lines = small
    train_imgs = [p for p, _ in lines["train"][:7]]
    val_imgs = [p for p, _ in lines["val"][:5]]
    n_train, n_val = FILE_DATASETS["inat2018"].official_lines["train"], FILE_DATASETS["inat2018"].official_lines["val"]
    y = (np.arange(n_train) * 7919) % 8142  # every class, not in class order
    vy = np.arange(n_val) % 8142
    d = tmp_path / "inat"
    d.mkdir()
    (d / "iNaturalist18_train.txt").write_text("".join(f"{train_imgs[i % 7]} {y[i]}\n" for i in range(n_train)))
    (d / "iNaturalist18_val.txt").write_text("".join(f"{val_imgs[i % 5]} {vy[i]}\n" for i in range(n_val)))
    for folder in ("train", "val"):
        (d / folder).symlink_to(root / folder, target_is_directory=True)
    fl = load_file_lists("inat2018", d, val_per_class=0)
    assert fl.official is True and fl.list_lines == {"train": n_train, "val": n_val}
    assert fl.train_y.tolist() == y.tolist() and fl.test_y.tolist() == vy.tolist()
    assert fl.train_paths[:7].tolist() == train_imgs and fl.train_paths[-1] == train_imgs[(n_train - 1) % 7]
    assert fl.train_counts == np.bincount(y, minlength=8142).tolist()
    carved = load_file_lists("inat2018", d)
    assert len(carved.train_y) + len(carved.val_y) == n_train and min(carved.train_counts) >= 1


# --- bad input: one line, exit code 2, no traceback ---------------------------------------------------


def _replace(index: int, new: str):
    def edit(lines: list[str]) -> list[str]:
        out = list(lines)
        out[index] = new + "\n"
        return out

    return edit


def _ghosts(first: int, n: int):
    """Lines ``first``.. of the list name ``n`` images that do not exist (the labels stay valid)."""

    def edit(lines: list[str]) -> list[str]:
        out = list(lines)
        for k in range(n):
            path, label = out[first + k].rsplit(None, 1)
            out[first + k] = f"{path}.ghost {label}\n"
        return out

    return edit


def _check_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and "\n" not in err and err.startswith("error: "), r.stderr
    assert r.stdout == ""
    for needle in needles:
        assert needle in err, (needle, err)
    return err


BAD_LINES = [
    # (id, list, 0-based line index, new line text, substrings of the message)
    (
        "no-label",
        "train",
        3,
        "train/n00000000/n00000000_train0.JPEG",
        ["line 4", "has no label", "relative/path label"],
    ),
    (
        "non-integer-label",
        "val",
        6,
        "train/n00000000/n00000000_val0.JPEG cat",
        ["line 7", "label 'cat' is not an integer"],
    ),
    ("float-label", "test", 0, "val/n00000000/n00000000_test0.JPEG 3.0", ["line 1", "label '3.0' is not an integer"]),
    ("extra-field", "train", 9, "train/n00000000/n00000000_train0.JPEG 3 5", ["line 10", "has 3 fields"]),
    (
        "label-too-large",
        "train",
        6,
        "train/n00000000/n00000000_train0.JPEG 1000",
        ["line 7", "label 1000 is outside the valid range 0..999"],
    ),
    (
        "negative-label",
        "test",
        11,
        "val/n00000000/n00000000_test0.JPEG -1",
        ["line 12", "label -1 is outside the valid range 0..999"],
    ),
]


@pytest.mark.parametrize("case, split, index, text, needles", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_bad_line_is_one_line_naming_file_and_line(inet, tmp_path, case, split, index, text, needles):
    root, _ = inet
    d = with_lists(root, tmp_path / "d", "ImageNet_LT", edit={split: _replace(index, text)})
    _check_error(study("data", "imagenet-lt", "--data-dir", str(d)), str(d / f"ImageNet_LT_{split}.txt"), *needles)


def test_missing_images_name_the_first_and_count_the_rest(inet, tmp_path):
    root, lines = inet
    d = with_lists(root, tmp_path / "d", "ImageNet_LT", edit={"train": _ghosts(4, 30), "test": _ghosts(100, 12)})
    first = lines["train"][4][0] + ".ghost"
    _check_error(
        study("data", "imagenet-lt", "--data-dir", str(d)),
        str(d / "ImageNet_LT_train.txt"),
        "line 5",
        first,
        "and 41 more missing",
        "30 in ImageNet_LT_train.txt, 12 in ImageNet_LT_test.txt",
    )


def test_empty_list_is_an_error(inet, tmp_path):
    root, _ = inet
    d = with_lists(root, tmp_path / "d", "ImageNet_LT", edit={"val": lambda lines: ["\n", "  \n"]})
    _check_error(study("data", "imagenet-lt", "--data-dir", str(d)), str(d / "ImageNet_LT_val.txt"), "is empty")


def test_wrong_layout_says_what_is_expected_and_where_to_get_the_lists(inet, tmp_path):
    root, _ = inet
    d = with_lists(root, tmp_path / "d", "ImageNet_LT", edit={s: None for s in ("train", "val", "test")})
    _check_error(
        study("data", "imagenet-lt", "--data-dir", str(d)),
        f"ImageNet_LT_train.txt, ImageNet_LT_val.txt, ImageNet_LT_test.txt in {d}/ or {d}/ImageNet_LT/",
        "not shipped",
        "facebookresearch/classifier-balancing",
    )
    partial = with_lists(root, tmp_path / "p", "ImageNet_LT", edit={"test": None})
    _check_error(study("data", "imagenet-lt", "--data-dir", str(partial)), "but not ImageNet_LT_test.txt")
    _check_error(
        study("data", "inat2018", "--data-dir", str(d)),
        "iNaturalist18_train.txt, iNaturalist18_val.txt",
        "data/iNaturalist18/",
    )
    _check_error(
        study("data", "places-lt", "--data-dir", str(tmp_path / "nowhere")), "is not a folder", "Places_LT_test.txt"
    )


def test_missing_data_dir_is_an_error():
    _check_error(study("data", "imagenet-lt"), "pass --data-dir DIR", "classifier-balancing")
    _check_error(study("data", "split-files"), "pass --data-dir DIR")


def test_class_without_training_images_and_shared_images_are_errors(inet, tmp_path):
    root, lines = inet
    no_999 = with_lists(
        root,
        tmp_path / "a",
        "ImageNet_LT",
        edit={"train": lambda ls: [line for line in ls if not line.endswith(" 999\n")]},
    )
    _check_error(
        study("data", "imagenet-lt", "--data-dir", str(no_999)),
        "class 999 has no training image",
        "not the ImageNet-LT lists",
    )
    leak = lines["train"][0]
    shared = with_lists(root, tmp_path / "b", "ImageNet_LT", edit={"test": lambda ls: ls + [f"{leak[0]} {leak[1]}\n"]})
    _check_error(
        study("data", "imagenet-lt", "--data-dir", str(shared)),
        str(shared / "ImageNet_LT_test.txt"),
        f"line {len(lines['test']) + 1}",
        leak[0],
        "must not share images",
    )


def test_split_files_and_option_mistakes(small):
    root, _ = small
    _check_error(study("data", "split-files", "--data-dir", str(root), "--train-list", "mine_train.txt"), "--test-list")
    _check_error(
        study(
            "data", "split-files", "--data-dir", str(root), "--train-list", "nope.txt", "--test-list", "mine_test.txt"
        ),
        f"{root / 'nope.txt'}",
        "not found",
    )
    _check_error(
        study("data", "imagenet-lt", "--data-dir", str(root), "--imbalance-factor", "10"),
        "--imbalance-factor does not apply",
    )
    _check_error(
        study("data", "imagenet-lt", "--data-dir", str(root), "--val-per-class", "5"), "--val-per-class does not apply"
    )
    _check_error(
        study("data", "inat2018", "--data-dir", str(root), "--protocol", "honest", "--val-per-class", "0"),
        "val_per_class",
    )
    _check_error(study("data", "imagenet-l"), "did you mean 'imagenet-lt'")
