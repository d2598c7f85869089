"""Fashion-MNIST-LT: the IDX loader on generated files (``idx_files`` beside this file), its search
for the files, its one-line errors, the long-tailed counts and groups, the ``n_max`` cap, the
test-selection space, the augmentation and the ResNet-8 backbone, and a tiny ``study train``.

None of these tests needs the Debian package: an autouse fixture points the system location at an
empty folder (the one test that reads the real files is skipped when they are not installed)."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from study.cli import main
from study.config.datasets import DATASETS, lt_counts
from study.config.groups import shot_groups
from study.config.schema import DataConfig
from study.config.spaces import load_space
from study.data.device import Augmenter
from study.data.longtail import build_lt, describe, load_data
from study.data.sources import LOADERS
from study.errors import ConfigError, UserError
from study.testing.idx_files import FASHION_IF100, IMAGES_MAGIC, LABELS_MAGIC, NAMES, idx_bytes, write_fashion_mnist
from study.training.models import MODELS, build_model, count_parameters

SPEC = DATASETS["fashion-mnist-lt"]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def no_system_files(monkeypatch, tmp_path_factory, no_download):
    """Never fall back to an installed dataset-fashion-mnist (or download): tests see only the files
    they write. Returns the (empty) folder that stands in for /usr/share/datasets/fashion-mnist."""
    import study.data.sources as data_mod

    system = tmp_path_factory.mktemp("system-fashion-mnist")
    monkeypatch.setattr(data_mod, "FASHION_MNIST_SYSTEM_DIRS", (str(system),))
    return system


def load_raw(data_dir):
    return LOADERS["fashion-mnist-lt"](data_dir, False)


# --- the IDX files and the reader ------------------------------------------------------------------------


def test_writer_produces_the_official_idx_layout(tmp_path):
    f = write_fashion_mnist(tmp_path, per_class_train=3, per_class_test=2, seed=1, gz=False)
    assert [p.name for p in f.files] == sorted(NAMES)
    blob = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    assert struct.unpack(">IIII", blob[:16]) == (IMAGES_MAGIC, 30, 28, 28) and len(blob) == 16 + 30 * 784
    assert blob[:4] == b"\x00\x00\x08\x03"
    blob = (tmp_path / "t10k-labels-idx1-ubyte").read_bytes()
    assert struct.unpack(">II", blob[:8]) == (LABELS_MAGIC, 20) and len(blob) == 8 + 20
    assert blob[:4] == b"\x00\x00\x08\x01"
    # torchvision's reader, independently of the loader
    from torchvision.datasets.mnist import read_image_file, read_label_file

    np.testing.assert_array_equal(read_image_file(str(tmp_path / "train-images-idx3-ubyte")).numpy(), f.train_x[:, 0])
    np.testing.assert_array_equal(read_label_file(str(tmp_path / "t10k-labels-idx1-ubyte")).numpy(), f.test_y)
    assert not np.all(np.diff(f.train_y) >= 0)  # labels interleaved, as in the real files
    with pytest.raises(ValueError):
        idx_bytes(np.zeros((1, 1, 1, 1)))


@pytest.mark.parametrize("gz", [True, False, (True, False, False, True)])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_loader_reads_gzipped_and_plain_files_in_both_layouts(tmp_path, monkeypatch, gz, layout):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    f = write_fashion_mnist(
        tmp_path, per_class_train=[4, 3, 5, 2, 6, 3, 4, 2, 3, 5], per_class_test=2, seed=2, gz=gz, layout=layout
    )
    if layout == "torchvision":
        assert f.folder == tmp_path / "FashionMNIST" / "raw"
    raw = load_raw(tmp_path)
    assert raw.train_x.shape == (37, 1, 28, 28) and raw.train_x.dtype == np.uint8
    np.testing.assert_array_equal(raw.train_x, f.train_x)
    np.testing.assert_array_equal(raw.train_y, f.train_y)
    np.testing.assert_array_equal(raw.test_x, f.test_x)
    np.testing.assert_array_equal(raw.test_y, f.test_y)
    assert raw.train_y.dtype == np.int64 and np.bincount(raw.train_y).tolist() == [4, 3, 5, 2, 6, 3, 4, 2, 3, 5]
    assert raw.official is False  # generated files are not the official release
    assert raw.source == str(f.folder.resolve())
    assert list(scratch.iterdir()) == []  # the decompressed temporaries are gone


def test_search_order_torchvision_layout_then_folder_then_system(tmp_path, no_system_files):
    flat = write_fashion_mnist(tmp_path, seed=3)
    tv = write_fashion_mnist(tmp_path, seed=4, layout="torchvision")
    system = write_fashion_mnist(no_system_files, seed=5)
    np.testing.assert_array_equal(load_raw(tmp_path).train_x, tv.train_x)
    for p in tv.files:
        p.unlink()
    np.testing.assert_array_equal(load_raw(tmp_path).train_x, flat.train_x)
    empty = tmp_path / "empty"
    empty.mkdir()
    raw = load_raw(empty)  # nothing in --data-dir: the system location (Debian's) is used
    np.testing.assert_array_equal(raw.train_x, system.train_x)
    assert raw.source == str(no_system_files)


def test_plain_file_wins_over_its_gz(tmp_path):
    write_fashion_mnist(tmp_path, seed=6, gz=True)
    plain = write_fashion_mnist(tmp_path, seed=7, gz=False)
    np.testing.assert_array_equal(load_raw(tmp_path).train_x, plain.train_x)


def test_official_flag_checks_the_uncompressed_content(tmp_path, monkeypatch):
    import study.data.sources as data_mod

    f = write_fashion_mnist(tmp_path, seed=8, gz=(True, False, True, False))
    md5 = {}
    for n in NAMES:
        p = tmp_path / n
        blob = p.read_bytes() if p.exists() else gzip.decompress((tmp_path / f"{n}.gz").read_bytes())
        md5[n] = hashlib.md5(blob).hexdigest()
    monkeypatch.setattr(data_mod, "FASHION_MNIST_MD5", md5)
    assert load_raw(tmp_path).official is True
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(f.train_y[::-1].astype(np.uint8)))
    assert load_raw(tmp_path).official is False


@pytest.mark.skipif(
    not all((DEBIAN / f"{n}.gz").is_file() for n in NAMES), reason="dataset-fashion-mnist is not installed"
)
def test_the_installed_debian_files_are_official_and_match_the_statistics(monkeypatch, tmp_path):
    import study.data.sources as data_mod

    monkeypatch.setattr(data_mod, "FASHION_MNIST_SYSTEM_DIRS", (str(DEBIAN),))
    raw = load_raw(tmp_path)
    assert raw.official is True and raw.source == str(DEBIAN)
    assert raw.train_x.shape == (60000, 1, 28, 28) and raw.test_x.shape == (10000, 1, 28, 28)
    assert np.bincount(raw.train_y).tolist() == [6000] * 10 and np.bincount(raw.test_y).tolist() == [1000] * 10
    x = raw.train_x.astype(np.float64) / 255.0
    assert round(float(x.mean()), 4) == SPEC.mean[0] and round(float(x.std()), 4) == SPEC.std[0]


# --- missing and damaged files --------------------------------------------------------------------------


def test_missing_files_are_one_line_naming_the_package_and_data_dir(tmp_path, no_system_files):
    with pytest.raises(UserError) as e:
        load_data(DataConfig(dataset="fashion-mnist-lt"), data_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir DIR" in msg
    assert str(tmp_path.resolve() / "FashionMNIST" / "raw") in msg and str(no_system_files) in msg
    assert "train-images-idx3-ubyte[.gz]" in msg
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_partly_missing_files_are_named(tmp_path):
    write_fashion_mnist(tmp_path, seed=9)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError) as e:
        load_raw(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "incomplete" in msg and "t10k-labels-idx1-ubyte[.gz]" in msg
    assert "train-images" not in msg.split("lacks")[1].split(";")[0]


@pytest.mark.parametrize(
    "name, damage",
    [
        ("train-images-idx3-ubyte.gz", "truncate"),  # gzip stream ends early
        ("t10k-labels-idx1-ubyte.gz", "garbage"),  # not gzip at all
        ("train-images-idx3-ubyte", "truncate"),  # fewer bytes than the header says
        ("train-labels-idx1-ubyte", "garbage"),  # bad magic number
        ("t10k-images-idx3-ubyte", "labels"),  # a labels file where images belong
    ],
)
def test_corrupt_files_are_one_line_errors(tmp_path, name, damage):
    write_fashion_mnist(tmp_path, per_class_train=4, seed=10, gz=name.endswith(".gz"))
    p = tmp_path / name
    blob = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage":
        p.write_bytes(b"not an idx file at all" * 4)
    else:
        p.write_bytes(idx_bytes(np.zeros(20, dtype=np.uint8)))
    with pytest.raises(UserError) as e:
        load_raw(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "truncated or corrupt" in msg and name in msg


def test_images_and_labels_that_disagree_are_an_error(tmp_path):
    f = write_fashion_mnist(tmp_path, per_class_train=3, seed=11, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(f.train_y[:-1].astype(np.uint8)))
    with pytest.raises(UserError, match="29 labels"):
        load_raw(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(30, 12, dtype=np.uint8)))
    with pytest.raises(UserError, match="outside 0..9"):
        load_raw(tmp_path)


def test_generated_files_too_small_for_the_full_profile(tmp_path):
    write_fashion_mnist(tmp_path, per_class_train=5, seed=12)
    with pytest.raises(UserError, match=r"fashion-mnist-lt: class 0 has 5 training images, fewer than the 5980 \+ 20"):
        load_data(DataConfig(dataset="fashion-mnist-lt"), data_dir=tmp_path)


# --- counts, groups and the n_max cap -------------------------------------------------------------------


def test_spec_follows_cifar10_lt():
    assert (SPEC.num_classes, SPEC.train_per_class, SPEC.test_per_class, SPEC.shape) == (10, 6000, 1000, (1, 28, 28))
    assert SPEC.default_imbalance_factor == 100 and (SPEC.many_threshold, SPEC.few_threshold) == (1000, 200)
    assert SPEC.mean == (0.2860,) and SPEC.std == (0.3530,)
    assert SPEC.crop_padding == 2 and SPEC.flip is True and SPEC.needs_files


@pytest.mark.parametrize("n_max, groups", [(5980, (4, 3, 3)), (6000, (4, 3, 3)), (3000, (3, 3, 4))])
def test_profile_counts_and_all_groups_non_empty(n_max, groups):
    counts = lt_counts(n_max, 10, 100)
    assert counts == FASHION_IF100[n_max]
    assert counts[0] == n_max and counts[-1] == n_max // 100
    g = shot_groups(counts, 1000, 200)
    assert tuple(int((g == k).sum()) for k in ("many", "medium", "few")) == groups
    assert min(groups) > 0
    # the CIFAR-100 thresholds would leave Few empty
    assert "few" not in shot_groups(counts, 100, 20)


def test_describe_default_is_6000_minus_validation():
    info = describe(DataConfig(dataset="fashion-mnist-lt"))
    assert info["n_max"] == 5980 and info["train_counts"] == FASHION_IF100[5980]
    assert info["total_train"] == 14837 and info["val_per_class"] == 20 and info["test_per_class"] == 1000
    assert info["groups"] == {"many": 4, "medium": 3, "few": 3}
    assert info["thresholds"] == {"many_gt": 1000, "few_lt": 200}
    capped = describe(DataConfig(dataset="fashion-mnist-lt", n_max=3000))
    assert capped["n_max"] == 3000 and capped["train_counts"] == FASHION_IF100[3000]
    assert capped["total_train"] == 7443 and capped["groups"] == {"many": 3, "medium": 3, "few": 4}


def test_study_data_json(capsys):
    capsys.readouterr()
    assert main(["data", "fashion-mnist-lt", "--format", "json"]) == 0  # no image file needed
    info = json.loads(capsys.readouterr().out)
    assert info["dataset"] == "fashion-mnist-lt" and info["num_classes"] == 10
    assert info["train_counts"] == lt_counts(6000 - 20, 10, 100) == FASHION_IF100[5980]
    assert info["total_train"] == 14837 and info["groups"] == {"many": 4, "medium": 3, "few": 3}
    assert info["selection_split"] == "val" and info["imbalance_factor"] == 100
    assert main(["data", "fashion-mnist-lt", "--format", "json", "--protocol", "wb-parity"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["train_counts"] == FASHION_IF100[6000] and info["val_per_class"] == 0
    assert main(["data", "fashion-mnist-lt"]) == 0
    out = capsys.readouterr().out
    assert "total train 14837" in out and "1000/200" in out


def test_n_max_is_validated():
    DataConfig(dataset="fashion-mnist-lt", n_max=5980)
    DataConfig(dataset="fashion-mnist-lt", n_max=6000, val_per_class=0)
    with pytest.raises(ConfigError, match=r"n_max: 5981 is more than the 5980"):
        DataConfig(dataset="fashion-mnist-lt", n_max=5981)
    with pytest.raises(ConfigError, match="n_max"):
        DataConfig(dataset="fashion-mnist-lt", n_max=0)
    with pytest.raises(ConfigError, match=r"n_max: 101 is more than the 100"):
        DataConfig(dataset="digits-lt", n_max=101)  # digits' own cap of 100 still applies
    with pytest.raises(UserError, match=r"fashion-mnist-lt.yaml: data.n_max: 7000"):
        load_space("fashion-mnist-lt", ["data.n_max=7000"])


def test_n_max_cap_on_small_generated_files_keeps_splits_disjoint(tmp_path):
    counts = lt_counts(40, 10, 10)
    assert counts == [40, 30, 23, 18, 14, 11, 8, 6, 5, 4]
    write_fashion_mnist(tmp_path, per_class_train=[n + 5 for n in counts], per_class_test=3, seed=13)
    cfg = DataConfig(dataset="fashion-mnist-lt", imbalance_factor=10, n_max=40, val_per_class=5)
    data = load_data(cfg, data_dir=tmp_path)
    assert data.train_counts == counts and np.bincount(data.train_y, minlength=10).tolist() == counts
    assert np.bincount(data.val_y, minlength=10).tolist() == [5] * 10
    assert np.bincount(data.test_y, minlength=10).tolist() == [3] * 10
    train = {x.tobytes() for x in data.train_x}
    val = {x.tobytes() for x in data.val_x}
    assert len(train) == len(data.train_x) and not train & val
    assert data.official is False and len(data.subset_hash) == 16


def test_fixed_n_max_gives_the_same_training_images_with_and_without_validation(tmp_path):
    write_fashion_mnist(tmp_path, per_class_train=60, per_class_test=2, seed=14)  # 40 + 20 for validation
    raw = load_raw(tmp_path)
    honest = build_lt(raw, DataConfig(dataset="fashion-mnist-lt", imbalance_factor=10, n_max=40))
    on_test = build_lt(raw, DataConfig(dataset="fashion-mnist-lt", imbalance_factor=10, n_max=40, val_per_class=0))
    np.testing.assert_array_equal(honest.train_x, on_test.train_x)
    np.testing.assert_array_equal(honest.train_y, on_test.train_y)
    assert honest.selection_split == "val" and on_test.selection_split == "test" and len(on_test.val_y) == 0


# --- the two shipped spaces -----------------------------------------------------------------------------


def test_shipped_spaces_differ_only_in_the_selection_split():
    honest = load_space("fashion-mnist-lt")
    on_test = load_space("fashion-mnist-lt-test-selection")
    assert honest.protocol == "honest" and on_test.protocol == "test-selection"
    assert honest.data.val_per_class == 20 and on_test.data.val_per_class == 0
    a, b = honest.to_dict(), on_test.to_dict()
    for d in (a, b):
        d.pop("space"), d.pop("protocol"), d["data"].pop("val_per_class")
    assert a == b
    assert describe(honest.data)["train_counts"] == describe(on_test.data)["train_counts"] == FASHION_IF100[3000]
    # the full study: CE with and without weight decay, the stage-2 methods, 3 seeds
    assert honest.variants["ce"].config.weight_decay == 0 and "weight_decay" in honest.variants["ce-wd"].params
    assert honest.feeds_stage2 == ("ce-wd",) and honest.seeds == (0, 1, 2)
    assert {"none", "l2-norm", "tau-norm", "cb", "cb-wd", "cb-maxnorm", "wb", "crt", "lws", "ncm", "la-add"} <= set(
        honest.stage2
    )
    assert honest.stage1.backbone == "resnet8" and honest.stage2["wb"].augment is False


def test_test_selection_protocol_requires_no_validation_split():
    with pytest.raises(UserError, match="test-selection protocol selects on the test set"):
        load_space("fashion-mnist-lt-test-selection", ["data.val_per_class=20"])
    with pytest.raises(UserError, match="honest protocol needs a validation split"):
        load_space("fashion-mnist-lt", ["data.val_per_class=0"])


# --- augmentation and backbone --------------------------------------------------------------------------


def test_augmentation_is_a_2px_crop_with_flip():
    aug = Augmenter(SPEC, "cpu", True)
    assert aug.pad == 2 and aug.flip
    x = torch.randint(0, 256, (12, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    out = aug(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    xp = F.pad(x.float() / 255.0, (2, 2, 2, 2))
    norm = lambda w: (w - 0.2860) / 0.3530
    flipped = 0
    for b in range(len(x)):
        wins = [xp[b, :, i : i + 28, j : j + 28] for i in range(5) for j in range(5)]
        plain = any(torch.allclose(out[b], norm(w), atol=1e-5) for w in wins)
        mirrored = any(torch.allclose(out[b], norm(w.flip(2)), atol=1e-5) for w in wins)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 0 < flipped < len(x)


def test_resnet8_backbone_for_1x28x28():
    assert "resnet8" in MODELS
    model = build_model("resnet8", 10, SPEC.shape[0], seed=0).eval()
    assert count_parameters(model) == 75_002
    assert model.backbone.conv1.in_channels == 1 and model.feat_dim == 64
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert model.features(x).shape == (3, 64) and model(x).shape == (3, 10)


# --- end to end through the real CLI --------------------------------------------------------------------

TINY = [
    "--seeds",
    "1",
    "--set",
    "data.n_max=40",
    "--set",
    "data.imbalance_factor=10",
    "--set",
    "stage1.epochs=1",
    "--set",
    "stage2.epochs=1",
    "--device",
    "cpu",
]


@pytest.fixture
def tiny_files(tmp_path):
    """Generated IDX files with the 40 ... 4 counts (IF 10) plus 5 validation images per class."""
    write_fashion_mnist(
        tmp_path / "fm",
        per_class_train=[n + 5 for n in lt_counts(40, 10, 10)],
        per_class_test=4,
        seed=15,
        layout="torchvision",
    )
    return tmp_path / "fm"


def test_study_train_on_generated_idx_files(tmp_path, tiny_files, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(
        [
            "train",
            "fashion-mnist-lt",
            "--data-dir",
            str(tiny_files),
            "--out",
            str(out),
            "--set",
            "data.val_per_class=5",
            *TINY,
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "fashion-mnist-lt" and m["protocol"] == "honest" and m["selection_split"] == "val"
    run = m["runs"][0]
    assert run["stage1"]["val"] is not None and 0 <= run["stage2"]["test"]["all"] <= 1
    assert len(run["stage2"]["test"]["per_class"]) == 10
    assert m["config"]["space"]["data"]["n_max"] == 40


def test_study_train_test_selection_on_generated_idx_files(tmp_path, tiny_files, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["train", "fashion-mnist-lt-test-selection", "--data-dir", str(tiny_files), "--out", str(out), *TINY])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"] == "test-selection" and m["selection_split"] == "test"
    assert m["runs"][0]["stage1"]["val"] is None


def test_study_train_with_missing_files_exits_2_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    rc = main(
        [
            "train",
            "fashion-mnist-lt",
            "--data-dir",
            str(empty),
            "--results-dir",
            str(tmp_path / "results"),
            "--device",
            "cpu",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Fashion-MNIST files not found")
    assert "apt-get install dataset-fashion-mnist" in lines[0] and "--data-dir DIR" in lines[0]
    assert not (tmp_path / "results").exists() and list(empty.iterdir()) == []
