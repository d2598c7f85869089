"""Long-tailed counts, Many/Medium/Few groups, the real CIFAR loader on generated files, and the
on-device augmentation (docs/reference.md §1, §2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from study.config.datasets import DATASETS, lt_counts, n_max_for
from study.config.groups import shot_groups
from study.config.schema import DataConfig
from study.data.device import Augmenter
from study.data.longtail import build_lt, describe, load_data
from study.data.samplers import epoch_order
from study.data.sources import LOADERS
from study.errors import UserError
from study.testing.cifar_files import CIFAR10, CIFAR10_TOTALS, CIFAR100_IF100, write_cifar10, write_cifar100

# --- counts -----------------------------------------------------------------------------------------


def test_cifar100_if100_counts_match_reference_list():
    counts = lt_counts(500, 100, 100)
    assert counts == CIFAR100_IF100
    assert sum(counts) == 10847
    assert counts[:3] == [500, 477, 455] and counts[-4:] == [5, 5, 5, 5]


@pytest.mark.parametrize(
    "imbalance, total, lo, groups",
    [
        (10, 19573, 50, (69, 31, 0)),
        (50, 12608, 10, (41, 41, 18)),
        (100, 10847, 5, (35, 35, 30)),
        (200, 9502, 2, (30, 31, 39)),
    ],
)
def test_cifar100_totals_and_groups(imbalance, total, lo, groups):
    counts = lt_counts(500, 100, imbalance)
    assert sum(counts) == total
    assert max(counts) == counts[0] == 500 and min(counts) == counts[-1] == lo
    assert counts == sorted(counts, reverse=True)
    g = shot_groups(counts, 100, 20)
    assert tuple(int((g == k).sum()) for k in ("many", "medium", "few")) == groups


@pytest.mark.parametrize("imbalance, total", CIFAR10_TOTALS)
def test_cifar10_counts_match_reference_lists(imbalance, total):
    counts = lt_counts(5000, 10, imbalance)
    assert counts == CIFAR10[imbalance]
    assert sum(counts) == total


def test_cifar100_if100_group_boundaries_fall_where_the_reference_says():
    g = shot_groups(CIFAR100_IF100, 100, 20)
    # many/medium between class 34 (102) and 35 (98); medium/few between 69 (20) and 70 (19)
    assert list(g[:35]) == ["many"] * 35
    assert list(g[35:70]) == ["medium"] * 35
    assert list(g[70:]) == ["few"] * 30


def test_step_profile():
    assert lt_counts(500, 100, 100, "step") == [500] * 50 + [5] * 50
    assert lt_counts(5000, 10, 10, "step") == [5000] * 5 + [500] * 5
    # odd class count: the first C // 2 classes are the large ones; int truncation for the rest
    assert lt_counts(10, 5, 3, "step") == [10, 10, 3, 3, 3]


def test_balanced_and_invalid_profiles():
    assert lt_counts(480, 100, 1) == [480] * 100
    assert lt_counts(7, 1, 100) == [7]
    with pytest.raises(UserError, match="below 1"):
        lt_counts(500, 100, 0.5)
    with pytest.raises(UserError, match="unknown count profile"):
        lt_counts(500, 100, 100, "linear")


def test_honest_protocol_reserves_validation_before_counting():
    spec = DATASETS["cifar100-lt"]
    cfg = DataConfig(dataset="cifar100-lt", imbalance_factor=100)  # honest defaults: 20 val per class
    assert cfg.val_per_class == 20
    assert n_max_for(spec, 20) == 480
    info = describe(cfg)
    assert info["train_counts"] == lt_counts(480, 100, 100)
    assert info["train_counts"][0] == 480
    assert info["total_train"] == sum(lt_counts(480, 100, 100))
    assert info["val_per_class"] == 20 and info["test_per_class"] == 100
    # the wb-parity counts use all 500 images per class
    wb = describe(DataConfig(dataset="cifar100-lt", imbalance_factor=100, val_per_class=0, subset="first"))
    assert wb["train_counts"] == CIFAR100_IF100 and wb["total_train"] == 10847
    assert wb["groups"] == {"many": 35, "medium": 35, "few": 30}


def test_digits_counts_and_groups():
    info = describe(DataConfig(dataset="digits-lt"))
    assert info["train_counts"] == [100, 71, 51, 36, 26, 18, 13, 9, 6, 5]
    assert info["groups"] == {"many": 3, "medium": 3, "few": 4}


# --- Many / Medium / Few thresholds ---------------------------------------------------------------------


def test_shot_group_boundaries():
    counts = [101, 100, 99, 21, 20, 19, 0, 500]
    assert list(shot_groups(counts, 100, 20)) == ["many", "medium", "medium", "medium", "medium", "few", "few", "many"]
    # custom thresholds (HN410's CIFAR-10 ones): >1000 many, <200 few
    assert list(shot_groups([1001, 1000, 200, 199], 1000, 200)) == ["many", "medium", "medium", "few"]


# --- the real CIFAR loader on generated files --------------------------------------------------------------


def _class_indices(y: np.ndarray, c: int) -> np.ndarray:
    return np.where(y == c)[0]


@pytest.fixture(scope="module")
def raw100(cifar100_lt_files):
    """The session's CIFAR-100 files read by the core's loader (once per module)."""
    return LOADERS["cifar100-lt"](cifar100_lt_files.root, False)


def test_generated_files_load_in_file_order(cifar100_lt_files, raw100):
    f = cifar100_lt_files
    assert raw100.train_x.dtype == np.uint8 and raw100.train_x.shape == (len(f.train_y), 3, 32, 32)
    np.testing.assert_array_equal(raw100.train_x, f.train_x)
    np.testing.assert_array_equal(raw100.train_y, f.train_y)
    np.testing.assert_array_equal(raw100.test_x, f.test_x)
    np.testing.assert_array_equal(raw100.test_y, f.test_y)
    assert raw100.official is False  # generated files do not match the release's checksums
    assert raw100.source == str(f.folder.resolve())


def test_load_data_wb_parity_first_takes_first_images_in_file_order(cifar100_lt_files):
    f = cifar100_lt_files
    cfg = DataConfig(dataset="cifar100-lt", imbalance_factor=100, subset="first", val_per_class=0)
    data = load_data(cfg, data_dir=f.root, download=False)
    assert data.train_counts == CIFAR100_IF100
    assert len(data.train_y) == 10847
    assert np.bincount(data.train_y, minlength=100).tolist() == CIFAR100_IF100
    assert len(data.val_y) == 0 and data.selection_split == "test"
    assert data.official is False
    expected = np.concatenate([_class_indices(f.train_y, c)[:n] for c, n in enumerate(CIFAR100_IF100)])
    np.testing.assert_array_equal(data.train_x, f.train_x[expected])
    np.testing.assert_array_equal(data.train_y, f.train_y[expected])
    np.testing.assert_array_equal(data.test_x, f.test_x)
    np.testing.assert_array_equal(data.test_y, f.test_y)
    assert list(data.groups()[:35]) == ["many"] * 35 and list(data.groups()[70:]) == ["few"] * 30


def test_honest_split_val_and_train_are_disjoint(cifar100_lt_files, raw100):
    f = cifar100_lt_files
    counts = lt_counts(480, 100, 100)
    for subset in ("first", "shuffle"):
        data = build_lt(raw100, DataConfig(dataset="cifar100-lt", imbalance_factor=100, subset=subset))
        assert data.train_counts == counts
        assert np.bincount(data.train_y, minlength=100).tolist() == counts
        assert np.bincount(data.val_y, minlength=100).tolist() == [20] * 100
        assert data.selection_split == "val"
        train = {x.tobytes() for x in data.train_x}
        val = {x.tobytes() for x in data.val_x}
        assert len(train) == len(data.train_x) and len(val) == len(data.val_x)  # random images are unique
        assert not train & val
    # with `first`: training = the first n_c of each class, validation = the last 20 of each class
    data = build_lt(raw100, DataConfig(dataset="cifar100-lt", imbalance_factor=100, subset="first"))
    tr = np.concatenate([_class_indices(f.train_y, c)[:n] for c, n in enumerate(counts)])
    va = np.concatenate([_class_indices(f.train_y, c)[-20:] for c in range(100)])
    np.testing.assert_array_equal(data.train_x, f.train_x[tr])
    np.testing.assert_array_equal(data.val_x, f.train_x[va])
    np.testing.assert_array_equal(data.val_y, f.train_y[va])


def test_iclr24_split_rounds_counts_and_takes_validation_after_the_training_images():
    """HN410's split: round() counts (10,457 images, smallest class 5, groups 34/35/31) and the 20
    validation images right after each class's n_c training images (docs/reference.md §1.1). Checked on
    a full-size pool of image ids (build_lt only indexes the arrays)."""
    from study.data.sources import RawData

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(100), 500)
    rng.shuffle(y)
    ids = np.arange(len(y))
    raw = RawData(train_x=ids, train_y=y, test_x=ids[:10], test_y=y[:10])
    cfg = DataConfig(
        dataset="cifar100-lt", imbalance_factor=100, subset="first", rounding="round", val_from="after-train"
    )
    data = build_lt(raw, cfg)
    counts = data.train_counts
    assert sum(counts) == 10457 and counts[0] == 480 and min(counts) == 5
    assert [int((data.groups() == g).sum()) for g in ("many", "medium", "few")] == [34, 35, 31]
    tr = np.concatenate([_class_indices(y, c)[:n] for c, n in enumerate(counts)])
    va = np.concatenate([_class_indices(y, c)[n : n + 20] for c, n in enumerate(counts)])
    np.testing.assert_array_equal(data.train_x, tr)
    np.testing.assert_array_equal(data.val_x, va)
    # the default (val_from: end) takes each class's last 20 instead
    end = build_lt(raw, DataConfig(dataset="cifar100-lt", imbalance_factor=100, subset="first", rounding="round"))
    np.testing.assert_array_equal(end.val_x, np.concatenate([_class_indices(y, c)[-20:] for c in range(100)]))


@pytest.mark.parametrize(
    "dataset,imbalance,total",
    [("cifar100-lt", 50, 12152), ("cifar100-lt", 10, 18840), ("cifar100-lt", 200, 9167), ("cifar10-lt", 100, 12360)],
)
def test_iclr24_rounded_totals(dataset, imbalance, total):
    cfg = DataConfig(dataset=dataset, imbalance_factor=imbalance, rounding="round")
    assert describe(cfg)["total_train"] == total


def test_imbalance_factor_that_empties_a_class_is_an_error():
    with pytest.raises(UserError, match="leaves class .* with no training image"):
        lt_counts(480, 100, 1000)


def test_shuffle_without_validation_reproduces_ldam_drw(cifar100_lt_files, raw100):
    f = cifar100_lt_files
    before = np.random.get_state()
    data = build_lt(raw100, DataConfig(dataset="cifar100-lt", imbalance_factor=100, subset="shuffle", val_per_class=0))
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:], (
        "build_lt must not touch numpy's global RNG"
    )
    # LDAM-DRW imbalance_cifar.py::gen_imbalanced_data with rand_number=0
    try:
        np.random.seed(0)
        targets_np = np.array(f.train_y, dtype=np.int64)
        sel = []
        for the_class, the_img_num in zip(range(100), CIFAR100_IF100):
            idx = np.where(targets_np == the_class)[0]
            np.random.shuffle(idx)
            sel.append(idx[:the_img_num])
        sel = np.concatenate(sel)
    finally:
        np.random.set_state(before)
    np.testing.assert_array_equal(data.train_x, f.train_x[sel])
    np.testing.assert_array_equal(data.train_y, f.train_y[sel])
    first = build_lt(raw100, DataConfig(dataset="cifar100-lt", imbalance_factor=100, subset="first", val_per_class=0))
    assert not np.array_equal(first.train_x, data.train_x)


def test_subset_hash_tracks_the_subset_rule(cifar100_lt_files, raw100):
    f = cifar100_lt_files
    cfg_first = DataConfig(dataset="cifar100-lt", imbalance_factor=100, subset="first", val_per_class=0)
    h_first = build_lt(raw100, cfg_first).subset_hash
    assert len(h_first) == 16
    # re-loading the files gives the same hash
    assert load_data(cfg_first, data_dir=f.root, download=False).subset_hash == h_first
    others = {
        build_lt(
            raw100, DataConfig(dataset="cifar100-lt", imbalance_factor=100, subset="shuffle", val_per_class=0)
        ).subset_hash,
        build_lt(
            raw100,
            DataConfig(dataset="cifar100-lt", imbalance_factor=100, subset="shuffle", val_per_class=0, subset_seed=1),
        ).subset_hash,
        build_lt(
            raw100, DataConfig(dataset="cifar100-lt", imbalance_factor=200, subset="first", val_per_class=0)
        ).subset_hash,
        build_lt(raw100, DataConfig(dataset="cifar100-lt", imbalance_factor=100, subset="first")).subset_hash,
    }
    assert h_first not in others and len(others) == 4


def test_too_few_images_per_class_is_a_clear_error(cifar100_dir):
    with pytest.raises(UserError, match=r"class 0 has 5 training images, fewer than the 500 \+ 0"):
        load_data(
            DataConfig(dataset="cifar100-lt", val_per_class=0, subset="first"), data_dir=cifar100_dir, download=False
        )


def test_missing_files_raise_a_one_line_user_error(tmp_path, no_download):
    for download in (False, True):
        with pytest.raises(UserError) as e:
            load_data(DataConfig(dataset="cifar100-lt"), data_dir=tmp_path, download=download)
        msg = str(e.value)
        assert "\n" not in msg
        assert str(tmp_path.resolve() / "cifar-100-python" / "train") in msg
        assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg
        assert "--data-dir" in msg
    assert list(tmp_path.iterdir()) == []  # nothing written
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        load_data(DataConfig(dataset="cifar10-lt"), data_dir=tmp_path, download=False)


def test_partly_missing_files_are_named(cifar100_dir):
    (cifar100_dir / "cifar-100-python" / "meta").unlink()
    with pytest.raises(UserError, match=r"cifar-100-python/meta"):
        load_data(DataConfig(dataset="cifar100-lt"), data_dir=cifar100_dir, download=False)


@pytest.mark.parametrize(
    "name, damage", [("train", "truncate"), ("test", "truncate"), ("meta", "truncate"), ("train", "garbage")]
)
def test_corrupt_files_raise_a_user_error(cifar100_dir, name, damage):
    path = cifar100_dir / "cifar-100-python" / name
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else b"not a pickle at all" * 10)
    with pytest.raises(UserError) as e:
        load_data(DataConfig(dataset="cifar100-lt"), data_dir=cifar100_dir, download=False)
    msg = str(e.value)
    assert "truncated or corrupt" in msg and "\n" not in msg


def test_cifar10_format_round_trip_and_insufficient_images(tmp_path):
    f = write_cifar10(tmp_path, per_class_train=6, per_class_test=3, seed=3)
    names = sorted(p.name for p in f.files)
    assert names == [
        "batches.meta",
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ]
    raw = LOADERS["cifar10-lt"](tmp_path, False)
    np.testing.assert_array_equal(raw.train_x, f.train_x)  # the five batches, concatenated in order
    np.testing.assert_array_equal(raw.train_y, f.train_y)
    np.testing.assert_array_equal(raw.test_x, f.test_x)
    assert np.bincount(raw.train_y).tolist() == [6] * 10 and np.bincount(raw.test_y).tolist() == [3] * 10
    assert raw.official is False
    with pytest.raises(UserError, match=r"cifar10-lt: class 0 has 6 training images, fewer than the 4980 \+ 20"):
        build_lt(raw, DataConfig(dataset="cifar10-lt"))


def test_generated_images_are_reproducible_and_class_dependent(tmp_path):
    a = write_cifar100(tmp_path / "a", per_class_train=4, per_class_test=1, seed=7)
    b = write_cifar100(tmp_path / "b", per_class_train=4, per_class_test=1, seed=7)
    c = write_cifar100(tmp_path / "c", per_class_train=4, per_class_test=1, seed=8)
    assert (a.folder / "train").read_bytes() == (b.folder / "train").read_bytes()
    assert not np.array_equal(a.train_x, c.train_x)
    # labels are interleaved, not sorted
    assert not np.all(np.diff(a.train_y) >= 0)
    # the class colour makes per-class mean images differ far more than within-class noise
    means = np.stack([a.train_x[a.train_y == k].reshape(4, 3, -1).mean(axis=(0, 2)) for k in range(100)])
    assert np.ptp(means, axis=0).min() > 100


# --- augmentation -------------------------------------------------------------------------------------------


def _windows(x_uint8: torch.Tensor, aug: Augmenter, flips: bool) -> list[torch.Tensor]:
    """Every normalised crop of one zero-padded image (and their horizontal flips)."""
    p = aug.pad
    x = x_uint8.float().div_(255.0)[None]
    xp = F.pad(x, (p, p, p, p))
    H, W = x.shape[-2:]
    out = []
    for oy in range(2 * p + 1):
        for ox in range(2 * p + 1):
            win = xp[:, :, oy : oy + H, ox : ox + W]
            out.append(((win - aug.mean) / aug.std)[0])
            if flips:
                out.append(((win.flip(3) - aug.mean) / aug.std)[0])
    return out


def _random_images(n: int, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


def test_augmenter_crops_are_shifted_windows_of_the_zero_padded_image():
    spec = DATASETS["cifar100-lt"]
    aug = Augmenter(spec, "cpu", True)
    assert aug.pad == 4 and aug.flip
    x = _random_images(12, spec.shape, 0)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    for b in range(len(x)):
        assert any(torch.allclose(out[b], w, rtol=0, atol=1e-6) for w in _windows(x[b], aug, flips=True))


def test_augmenter_matches_a_manual_crop_for_the_drawn_offsets():
    spec = DATASETS["cifar10-lt"]
    aug = Augmenter(spec, "cpu", True)
    p = aug.pad
    x = _random_images(16, spec.shape, 1)
    out = aug(x, torch.Generator().manual_seed(42))
    # replay the generator: offsets (row, col) first, then the flip coin per image
    g = torch.Generator().manual_seed(42)
    off = torch.randint(0, 2 * p + 1, (len(x), 2), generator=g)
    flip = torch.rand(len(x), generator=g) < 0.5
    assert flip.any() and (~flip).any() and len({tuple(o) for o in off.tolist()}) > 1
    xp = F.pad(x.float() / 255.0, (p, p, p, p))
    for b in range(len(x)):
        oy, ox = off[b].tolist()
        win = xp[b, :, oy : oy + 32, ox : ox + 32]
        if flip[b]:
            win = win.flip(2)
        expected = (win - aug.mean[0]) / aug.std[0]
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-6)
    # padding is black: an offset-(0, 0) crop has 4 rows of zeros at the top
    z = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    assert torch.allclose(aug(z, torch.Generator().manual_seed(0)), aug.normalize(z))


def test_augmenter_is_deterministic_given_the_generator_state():
    spec = DATASETS["cifar100-lt"]
    aug = Augmenter(spec, "cpu", True)
    x = _random_images(8, spec.shape, 2)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    a = aug(x, g)
    g.set_state(state)
    b = aug(x, g)
    assert torch.equal(a, b)
    c = aug(x, g)  # the generator moved on
    assert not torch.equal(a, c)


def test_augmenter_off_is_plain_normalisation():
    spec = DATASETS["cifar100-lt"]
    aug = Augmenter(spec, "cpu", False)
    assert aug.pad == 0 and not aug.flip
    x = _random_images(4, spec.shape, 3)
    out = aug(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, aug.normalize(x), rtol=0, atol=1e-6)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(aug.normalize(x), (x.float() / 255 - mean) / std)


def test_digits_augmentation_has_no_flip():
    spec = DATASETS["digits-lt"]
    assert spec.flip is False
    aug = Augmenter(spec, "cpu", True)
    assert aug.pad == 1 and not aug.flip
    x = _random_images(16, spec.shape, 4)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for b in range(len(x)):
        assert any(torch.allclose(out[b], w, rtol=0, atol=1e-6) for w in _windows(x[b], aug, flips=False))


# --- epoch order ---------------------------------------------------------------------------------------------


def test_epoch_order_instance_and_class_balanced():
    labels = np.array([0] * 50 + [1] * 5 + [2] * 1)
    order = epoch_order(labels, 3, "instance", torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(56))
    cb = epoch_order(labels, 3, "class-balanced", torch.Generator().manual_seed(0))
    assert len(cb) == 56 and cb.dtype == torch.int64
    drawn = labels[cb.numpy()]
    # 4 consecutive images per class visit, classes in reshuffled cycles of 3: 14 visits = 4 full
    # cycles and 2 visits of a fifth, whatever the class sizes
    assert sorted(np.bincount(drawn, minlength=3).tolist()) == [16, 20, 20]
    assert all(len(set(drawn[i : i + 4])) == 1 for i in range(0, 56, 4))
