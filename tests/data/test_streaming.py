"""The streaming input pipeline for image-file datasets (study.data.streaming): Kang et al.'s transforms
against torchvision's, decoding of odd image modes, worker-count independence, exact replay,
unreadable images and drop_last."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from study.data.samplers import epoch_order
from study.data.streaming import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageListDataset,
    KangTransform,
    StreamSplit,
    UnreadableImage,
    draw_epoch_seed,
    load_rgb,
)
from study.testing.imagefolder_files import make_lt_tree, open_modes

SIZE = 32


def _images(n: int = 12, seed: int = 0) -> list[Image.Image]:
    """RGB images of varied sizes and aspect ratios (a few extreme ones hit the crop fallback)."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 40), (48, 33), (33, 48), (200, 12), (12, 200)]
    sizes += [(int(rng.integers(32, 49)), int(rng.integers(32, 49))) for _ in range(n - len(sizes))]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A small Kang-format tree (48 training images of 32-48 px, incl. grayscale, CMYK and RGBA PNG)."""
    root = tmp_path_factory.mktemp("lt-tree")
    lines = make_lt_tree(
        root, counts=(12, 9, 7, 6, 5, 4, 3, 2), val_per_class=1, test_per_class=1, min_side=32, max_side=48
    )
    return root, lines


def _split(tree, workers: int, **kw) -> StreamSplit:
    root, lines = tree
    paths, labels = zip(*lines["train"])
    # as study.data.filelists.FileLists gives them: an object array of paths, an int64 array of labels
    return StreamSplit(
        root,
        np.array(paths, dtype=object),
        np.array(labels, dtype=np.int64),
        KangTransform(SIZE),
        num_workers=workers,
        **kw,
    )


# --- transforms -------------------------------------------------------------------------------------


@pytest.mark.parametrize("jitter", [0.4, 0.0])
def test_train_transform_equals_torchvision_compose_with_the_same_params(monkeypatch, jitter):
    ours = KangTransform(SIZE, jitter=jitter)
    forced = {}

    def crop_params(img, scale, ratio):
        # torchvision passes its own ranges: they must be the ones ours draws from
        assert tuple(scale) == ours.scale == (0.08, 1.0) and tuple(ratio) == ours.ratio == (3 / 4, 4 / 3)
        return forced["p"].box

    def jitter_params(brightness, contrast, saturation, hue):
        assert brightness == contrast == saturation == (0.6, 1.4) and hue is None
        p = forced["p"]
        return torch.tensor(list(p.jitter_order) + [3]), *p.factors, None

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(crop_params))
    monkeypatch.setattr(T.ColorJitter, "get_params", staticmethod(jitter_params))
    seen_flips, seen_orders = set(), set()
    for k, img in enumerate(_images(16)):
        for s in range(3):
            p = ours.draw(np.random.default_rng([k, s]), *img.size)
            mine = ours(img, np.random.default_rng([k, s]))
            assert torch.equal(mine, ours.apply(img, p))  # __call__ draws exactly what draw() draws
            forced["p"] = p
            steps = [T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(p=1.0 if p.flip else 0.0)]
            if jitter:
                steps.append(T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0))
            else:
                assert p.factors is None and p.jitter_order == ()
            ref = T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
            assert mine.dtype == torch.float32 and mine.shape == (3, SIZE, SIZE)
            assert torch.equal(mine, ref), (k, s, p)
            seen_flips.add(p.flip)
            seen_orders.add(p.jitter_order)
    assert seen_flips == {True, False}
    if jitter:
        assert len(seen_orders) >= 4  # the op order really varies


def test_crop_flip_and_jitter_draws_follow_torchvision_distributions():
    ours = KangTransform(SIZE)
    rng = np.random.default_rng(1)
    square = Image.new("RGB", (100, 100))
    torch.manual_seed(0)
    mine, theirs = [], []
    for _ in range(3000):
        i, j, h, w = ours.crop_box(rng, 100, 100)
        assert 0 <= i and 0 <= j and i + h <= 100 and j + w <= 100
        mine.append((h * w / 1e4, math.log(w / h)))
        i, j, h, w = T.RandomResizedCrop.get_params(square, [0.08, 1.0], [3 / 4, 4 / 3])
        theirs.append((h * w / 1e4, math.log(w / h)))
    mine, theirs = np.array(mine), np.array(theirs)
    # same means within ~4 standard errors (area fraction ~U(0.08, 1): sd 0.27; log ratio sd ~0.17)
    assert abs(mine[:, 0].mean() - theirs[:, 0].mean()) < 4 * 0.27 * math.sqrt(2 / 3000)
    assert abs(mine[:, 1].mean() - theirs[:, 1].mean()) < 4 * 0.17 * math.sqrt(2 / 3000)
    assert mine[:, 0].min() >= 0.07 and abs(mine[:, 1]).max() <= math.log(4 / 3) + 0.05
    # where every attempt must fail, both take the same central fallback
    for w, h in [(400, 20), (20, 400), (60, 3)]:
        img = Image.new("RGB", (w, h))
        assert ours.crop_box(rng, w, h) == T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
    draws = [ours.draw(rng, 50, 50) for _ in range(600)]
    factors = np.array([d.factors for d in draws])
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and abs(factors.mean() - 1.0) < 0.03
    assert len({d.jitter_order for d in draws}) == 6
    assert abs(np.mean([d.flip for d in draws]) - 0.5) < 0.08


@pytest.mark.parametrize("size", [32, 40, 48, 224])
def test_eval_transform_equals_torchvision_resize_centercrop_exactly(size):
    ours = KangTransform(size, train=True, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    ref = T.Compose(
        [
            T.Resize(round(256 * size / 224)),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3)),
        ]
    )
    if size == 224:
        assert ours.eval_resize == 256  # Kang's Resize(256) + CenterCrop(224)
    for img in _images(8, seed=size):
        out = ours(img, None)  # no generator: the eval view, even for a training transform
        assert out.shape == (3, size, size)
        assert torch.equal(out, ref(img))
        assert torch.equal(
            KangTransform(size, train=False, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))(img, np.random.default_rng(0)),
            out,
        )


# --- decoding ---------------------------------------------------------------------------------------


def test_grayscale_cmyk_and_png_images_decode_to_three_channels(tree, tmp_path):
    root, lines = tree
    assert {"L", "CMYK", "RGBA", "RGB"} <= open_modes(root, lines["train"])
    rng = np.random.default_rng(0)
    palette = Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)).convert("P")
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png")
    Image.fromarray(rng.integers(0, 256, (33, 35), dtype=np.uint8), "L").convert("LA").save(tmp_path / "la.png")
    extra = [(str(tmp_path / "palette.png"), 0), (str(tmp_path / "la.png"), 1)]  # absolute paths too
    ds = ImageListDataset(
        root, [p for p, _ in lines["train"] + extra], [y for _, y in lines["train"] + extra], KangTransform(SIZE)
    )
    for i in range(len(ds)):
        assert load_rgb(ds.path(i)).mode == "RGB"
        x, y = ds[(i, None)]
        assert x.shape == (3, SIZE, SIZE) and y == ds.labels[i]
        x, _ = ds[(i, (7, i))]
        assert x.shape == (3, SIZE, SIZE)
    gray = next(i for i in range(len(ds)) if Image.open(ds.path(i)).mode == "L")
    x, _ = ds[gray]  # grey replicated into three equal channels (before normalisation)
    raw = x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    assert torch.allclose(raw[0], raw[1], atol=1e-6) and torch.allclose(raw[1], raw[2], atol=1e-6)


# --- the split --------------------------------------------------------------------------------------


def _collect(split, *args, **kw):
    return [(x.clone(), y.clone()) for x, y in split.batches(*args, **kw)]


def test_batches_are_identical_for_0_and_2_workers(tree):
    order = torch.cat([torch.randperm(48, generator=torch.Generator().manual_seed(3)), torch.tensor([5, 5, 0])])
    with _split(tree, 0) as s0, _split(tree, 2) as s2:
        rng_before = torch.get_rng_state()
        for epoch_seed in (11, 12):
            a, b = _collect(s0, order, 8, epoch_seed), _collect(s2, order, 8, epoch_seed)
            assert [len(y) for _, y in a] == [8] * 6 + [3]
            for (xa, ya), (xb, yb) in zip(a, b, strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert torch.equal(torch.cat([y for _, y in a]), s0.y[order])
        # the same image at two positions gets two different augmentations
        x = torch.cat([x for x, _ in a])
        assert not torch.equal(x[48], x[49])
        workers = list(s2._box.loader._iterator._workers)
        e0 = list(zip(*s2.eval_batches(16)))
        assert s2._box.loader._iterator._workers == workers  # the same processes across epochs and modes
        assert all(w.is_alive() for w in workers)
        e1 = list(zip(*s0.eval_batches(16)))
        assert torch.equal(torch.cat(e0[0]), torch.cat(e1[0]))
        assert torch.equal(torch.cat(e0[0])[7], s0.dataset[7][0])  # eval view, dataset order
        assert torch.equal(torch.cat(e0[1]), s0.y) and len(s0) == 48
        assert torch.equal(torch.get_rng_state(), rng_before)  # the global torch RNG is untouched


def test_same_order_and_epoch_seed_replay_the_same_batches(tree):
    split = _split(tree, 0)
    gen = torch.Generator().manual_seed(0)
    checkpoint = gen.get_state()

    def epoch(batch_size):
        gen.set_state(checkpoint)  # a resumed trial restores its generator and redraws the epoch
        order = epoch_order(split.y.cpu(), 8, "square-root", gen)
        return order, _collect(split, order, batch_size, draw_epoch_seed(gen))

    (order, first), (_, second) = epoch(10), epoch(10)
    for (xa, ya), (xb, yb) in zip(first, second, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    later = _collect(split, order, 10, draw_epoch_seed(gen))  # the next epoch's seed: other views
    assert not torch.equal(first[0][0], later[0][0])
    # a sample's view depends on its position in the order, not on how the order is cut in batches
    _, seven = epoch(7)
    assert torch.equal(torch.cat([x for x, _ in first]), torch.cat([x for x, _ in seven]))


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_raises_unreadable_image_naming_the_path(tree, tmp_path, workers):
    root, lines = tree
    good = root / lines["train"][0][0]
    blob = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(blob[: len(blob) // 2])
    paths = [str(good), str(tmp_path / "truncated.jpg"), str(tmp_path / "missing.jpg")]
    split = StreamSplit("/", paths, [0, 1, 2], KangTransform(SIZE), num_workers=workers)
    for bad in (1, 2):
        with pytest.raises(UnreadableImage) as info:
            list(split.batches(torch.tensor([0, bad]), 2, 5))
        msg = str(info.value)
        assert paths[bad] in msg and "\n" not in msg  # one line: the worker's traceback is stripped
        assert ("truncated" in msg) if bad == 1 else ("No such file" in msg)
    ((x, _),) = split.batches(torch.tensor([0]), 2, 5)  # the split (and its workers) still work
    assert x.shape == (1, 3, SIZE, SIZE)
    split.close()
    # DataLoader's own re-raise of a worker's exception gives an UnreadableImage too
    it = iter(torch.utils.data.DataLoader(split.dataset, batch_size=None, num_workers=workers))
    with pytest.raises(UnreadableImage, match="truncated.jpg"):
        list(it)
    if workers:
        it._shutdown_workers()  # now: collected later, in a cycle, it would wait 5 s for its worker


def test_drop_last_gives_floor_n_over_b_batches(tree):
    split = _split(tree, 0)
    order = torch.arange(23)
    assert [len(y) for _, y in split.batches(order, 5, 0, drop_last=True)] == [5] * 4  # floor(23 / 5)
    assert [len(y) for _, y in split.batches(order, 5, 0)] == [5] * 4 + [3]
    assert [len(y) for _, y in split.batches(order[:20], 5, 0, drop_last=True)] == [5] * 4
    assert list(split.batches(order[:4], 5, 0, drop_last=True)) == []


def test_a_split_collected_in_a_reference_cycle_stops_its_workers_promptly(tree):
    import gc
    import time

    split = _split(tree, 1)
    list(split.batches(torch.arange(4), 2, 0))
    (worker,) = split._box.loader._iterator._workers
    split.cycle = split  # trainers hold splits in cycles; collection must not wait on the workers
    del split
    t = time.perf_counter()
    gc.collect()
    worker.join(timeout=3)
    assert not worker.is_alive() and time.perf_counter() - t < 3


def test_starting_a_new_iteration_invalidates_an_unfinished_one(tree):
    with _split(tree, 1) as split:
        old = split.batches(torch.arange(20), 4, 0)
        next(old)
        new = _collect(split, torch.arange(20), 4, 1)  # shares the workers with `old`
        with pytest.raises(RuntimeError, match="another iteration"):
            next(old)
        assert len(new) == 5
