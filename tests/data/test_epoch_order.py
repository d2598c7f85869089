"""Stage-1 samplers of ``epoch_order`` (Kang et al., ICLR 2020): instance, class-balanced,
square-root and progressive — class histograms against their target probabilities, progressive's
exact endpoints, per-class cycles, determinism under the generator state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from study.config.datasets import SAMPLERS
from study.data.samplers import epoch_order
from study.errors import UserError

# A long-tailed label vector with an empty class (2), interleaved (not sorted by class) so that
# the class -> dataset index mapping is exercised. N = 8203 (not a multiple of 4).
COUNTS = np.array([5003, 2000, 0, 800, 300, 100])
C = len(COUNTS)
N = int(COUNTS.sum())
PRESENT = COUNTS > 0
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(C), COUNTS))
SIGMAS = 5.0  # per-class bound: |k_c - N p_c| <= 5 binomial standard deviations


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hist(order: torch.Tensor) -> np.ndarray:
    return np.bincount(LABELS[order.numpy()], minlength=C)


def _p_ib() -> np.ndarray:
    return COUNTS / COUNTS.sum()


def _p_cb() -> np.ndarray:
    return PRESENT / PRESENT.sum()


def _p_sqrt() -> np.ndarray:
    s = np.sqrt(COUNTS)
    return s / s.sum()


def _p_prog(a: float) -> np.ndarray:
    return (1 - a) * _p_ib() + a * _p_cb()


def _within(hist: np.ndarray, p: np.ndarray, sigmas: float = SIGMAS) -> bool:
    """Every class count within ``sigmas`` binomial standard deviations of N p_c (empty classes:
    exactly 0)."""
    n = hist.sum()
    sd = np.sqrt(n * p * (1 - p))
    return bool(np.all(np.abs(hist - n * p) <= sigmas * sd) and np.all(hist[p == 0] == 0))


def _legacy_epoch_order(labels, num_classes, sampler, gen):
    """The two samplers as they were before square-root/progressive (frozen copy): their outputs
    for a generator state must never change (resume tests, parity checks)."""
    labels = torch.as_tensor(labels).cpu()
    n = int(labels.shape[0])
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


# (sampler, epoch, epochs) covering every branch
CASES = [
    ("instance", 0, 1),
    ("class-balanced", 0, 1),
    ("square-root", 0, 1),
    ("progressive", 0, 5),
    ("progressive", 2, 5),
    ("progressive", 4, 5),
    ("progressive", 0, 1),
]


def test_samplers_tuple():
    from study.config.datasets import EPOCH_SAMPLERS

    assert EPOCH_SAMPLERS == ("instance", "class-balanced", "square-root", "progressive")
    assert SAMPLERS == EPOCH_SAMPLERS + ("class-aware-kang",)


@pytest.mark.parametrize("sampler, epoch, epochs", CASES)
def test_orders_are_valid_indices_of_length_n(sampler, epoch, epochs):
    order = epoch_order(LABELS, C, sampler, _gen(1), epoch, epochs)
    assert isinstance(order, torch.Tensor) and order.device.type == "cpu"
    assert order.dtype == torch.int64 and order.shape == (N,)
    assert int(order.min()) >= 0 and int(order.max()) < N
    assert _hist(order)[2] == 0  # the empty class is never drawn


def test_instance_is_a_permutation_with_exact_counts():
    order = epoch_order(LABELS, C, "instance", _gen(2))
    assert sorted(order.tolist()) == list(range(N))
    assert _hist(order).tolist() == COUNTS.tolist()


def test_class_balanced_is_uniform_up_to_one_visit_of_four():
    order = epoch_order(LABELS, C, "class-balanced", _gen(3))
    h = _hist(order)
    assert h[2] == 0
    k = h[PRESENT]
    # ceil(N / 4) = 2051 visits of 4 images in cycles over the 5 classes: one class gets 411 visits
    # (its last one cut to 3 images, N = 4 * 2051 - 1), the others 410
    assert sorted(k.tolist()) == [1640, 1640, 1640, 1640, 1643]
    assert np.all(np.abs(k - N / PRESENT.sum()) <= 4) and k.max() - k.min() <= 4
    drawn = LABELS[order.numpy()]
    assert all(len(set(drawn[i : i + 4])) == 1 for i in range(0, N, 4))


@pytest.mark.parametrize("sampler", ["instance", "class-balanced"])
def test_instance_and_class_balanced_are_unchanged(sampler):
    for seed in (0, 7):
        g_new, g_old = _gen(seed), _gen(seed)
        assert torch.equal(epoch_order(LABELS, C, sampler, g_new), _legacy_epoch_order(LABELS, C, sampler, g_old))
        assert torch.equal(g_new.get_state(), g_old.get_state())  # the same random numbers consumed
    small = np.array([0] * 50 + [1] * 5 + [2] * 1)
    assert torch.equal(epoch_order(small, 3, sampler, _gen(0)), _legacy_epoch_order(small, 3, sampler, _gen(0)))


def test_square_root_histogram_matches_sqrt_counts():
    h = _hist(epoch_order(LABELS, C, "square-root", _gen(4)))
    assert _within(h, _p_sqrt())
    # the bound discriminates: neither the instance- nor the class-balanced target passes
    assert not _within(h, _p_ib()) and not _within(h, _p_cb())


def test_square_root_histogram_over_several_epochs():
    g = _gen(5)
    total = sum(_hist(epoch_order(LABELS, C, "square-root", g)) for _ in range(4))
    assert _within(total, _p_sqrt())


@pytest.mark.parametrize(
    "sampler, epoch, epochs", [("square-root", 0, 1), ("progressive", 1, 4), ("progressive", 2, 4)]
)
def test_images_of_a_class_are_drawn_from_per_class_cycles(sampler, epoch, epochs):
    order = epoch_order(LABELS, C, sampler, _gen(6), epoch, epochs).numpy()
    per_image = np.bincount(order, minlength=N)
    under = over = False
    for c in np.flatnonzero(PRESENT):
        k = per_image[LABELS == c]  # draw count of each image of class c
        drawn = int(k.sum())
        assert k.max() - k.min() <= 1, (c, k.min(), k.max())
        assert k.min() == drawn // COUNTS[c]
        under |= drawn < COUNTS[c]
        over |= drawn > COUNTS[c]
    assert under and over  # both regimes (class drawn fewer / more times than its size) exercised


def test_progressive_endpoints_are_instance_and_class_balanced_bit_for_bit():
    for seed in (0, 11):
        g = _gen(seed)
        state = g.get_state()
        for epoch, epochs, same_as in [
            (0, 6, "instance"),
            (0, 1, "instance"),
            (5, 6, "class-balanced"),
            (1, 2, "class-balanced"),
        ]:
            g.set_state(state)
            ref = epoch_order(LABELS, C, same_as, g)
            after_ref = g.get_state()
            g.set_state(state)
            got = epoch_order(LABELS, C, "progressive", g, epoch=epoch, epochs=epochs)
            assert torch.equal(got, ref), (epoch, epochs, same_as)
            assert torch.equal(g.get_state(), after_ref)


@pytest.mark.parametrize("epoch, epochs", [(2, 5), (1, 5), (3, 5), (1, 3)])
def test_progressive_middle_epochs_follow_the_interpolation(epoch, epochs):
    a = epoch / (epochs - 1)
    h = _hist(epoch_order(LABELS, C, "progressive", _gen(7), epoch, epochs))
    assert _within(h, _p_prog(a))
    # discriminates from the neighbouring epochs' targets, the endpoints and (where they differ
    # enough to tell apart in one epoch) the off-by-one rule t/T = epoch / epochs
    assert not _within(h, _p_prog((epoch - 1) / (epochs - 1)))
    assert not _within(h, _p_prog((epoch + 1) / (epochs - 1)))
    assert not _within(h, _p_ib()) and not _within(h, _p_cb())
    if abs(a - epoch / epochs) >= 0.1:
        assert not _within(h, _p_prog(epoch / epochs))


def test_class_sequence_is_one_multinomial_draw_from_the_generator():
    """The RNG contract: the classes of the N draws are one ``torch.multinomial`` call (float64
    probabilities over the non-empty classes, with replacement) on ``gen``; the per-class cycles
    come after it. Pinning this keeps a checkpointed generator state meaning the same order."""
    for sampler, epoch, epochs, p in [("square-root", 0, 1, _p_sqrt()), ("progressive", 1, 3, _p_prog(0.5))]:
        g = _gen(13)
        state = g.get_state()
        order = epoch_order(LABELS, C, sampler, g, epoch, epochs)
        g.set_state(state)
        present = np.flatnonzero(PRESENT)
        cls = torch.multinomial(torch.as_tensor(p[present], dtype=torch.float64), N, replacement=True, generator=g)
        assert np.array_equal(LABELS[order.numpy()], present[cls.numpy()])


@pytest.mark.parametrize("sampler, epoch, epochs", [("square-root", 0, 1), ("progressive", 2, 5)])
def test_empty_classes_get_no_probability(sampler, epoch, epochs):
    """Many empty classes (14 more after the last label) change nothing: p^CB is 1/C over the
    present classes, and empty classes are left out of the class draw."""
    wide = epoch_order(LABELS, 20, sampler, _gen(14), epoch, epochs)
    assert torch.equal(wide, epoch_order(LABELS, C, sampler, _gen(14), epoch, epochs))
    h = np.bincount(LABELS[wide.numpy()], minlength=20)
    assert h[C:].sum() == 0 and h[2] == 0
    p = _p_sqrt() if sampler == "square-root" else _p_prog(epoch / (epochs - 1))
    assert _within(h[:C], p)


@pytest.mark.parametrize("sampler, epoch, epochs", CASES)
def test_order_is_a_function_of_the_generator_state(sampler, epoch, epochs):
    g = _gen(8)
    state = g.get_state()
    a = epoch_order(LABELS, C, sampler, g, epoch, epochs)
    after = g.get_state()
    g.set_state(state)
    b = epoch_order(LABELS, C, sampler, g, epoch, epochs)
    assert torch.equal(a, b) and torch.equal(g.get_state(), after)
    assert not torch.equal(a, epoch_order(LABELS, C, sampler, g, epoch, epochs))  # the state moved on
    assert not torch.equal(a, epoch_order(LABELS, C, sampler, _gen(9), epoch, epochs))  # another seed


def test_global_rng_is_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    np_before = np.random.get_state()[1].copy()
    for sampler, epoch, epochs in CASES:
        epoch_order(LABELS, C, sampler, _gen(10), epoch, epochs)
    assert torch.equal(torch.get_rng_state(), before)
    assert np.array_equal(np.random.get_state()[1], np_before)


def test_tensor_labels_and_large_n():
    counts = np.maximum((2000 * 0.01 ** (np.arange(100) / 99)).astype(int), 1)
    labels = torch.as_tensor(np.random.default_rng(1).permutation(np.repeat(np.arange(100), counts)))
    n = len(labels)
    assert n > 20000
    for sampler, epoch, epochs in [("square-root", 0, 1), ("progressive", 1, 3)]:
        order = epoch_order(labels, 100, sampler, _gen(12), epoch, epochs)
        assert order.shape == (n,) and order.dtype == torch.int64
        h = np.bincount(labels[order].numpy(), minlength=100)
        p = (
            np.sqrt(counts) / np.sqrt(counts).sum()
            if sampler == "square-root"
            else 0.5 * counts / counts.sum() + 0.5 / 100
        )
        sd = np.sqrt(n * p * (1 - p))
        assert np.all(np.abs(h - n * p) <= SIGMAS * sd)


def test_bad_arguments():
    with pytest.raises(UserError, match="unknown sampler 'sqrt'"):
        epoch_order(LABELS, C, "sqrt", _gen())
    for epoch, epochs in [(5, 5), (-1, 5), (0, 0)]:
        with pytest.raises(ValueError, match="progressive sampler"):
            epoch_order(LABELS, C, "progressive", _gen(), epoch, epochs)
