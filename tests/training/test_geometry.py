"""The fixed simplex-ETF classifier and the feature-geometry measures (study/training/geometry.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from study.training.geometry import (
    class_feature_norms,
    class_mean_cosine,
    cone_cosine,
    etf_directions,
    feature_summary,
    fisher_ratio,
    norm_count_spearman,
)

# --------------------------------------------------------------------------------------- ETF

ETF_SHAPES = [(10, 64), (10, 10), (10, 9), (100, 512), (100, 99), (2, 1), (3, 2)]


@pytest.mark.parametrize("C,d", ETF_SHAPES)
def test_etf_rows_are_unit_vectors_with_equal_negative_cosines(C, d):
    w = etf_directions(C, d, seed=3)
    assert w.shape == (C, d) and w.dtype == torch.float32
    g = w.double() @ w.double().T
    assert torch.allclose(torch.diagonal(g), torch.ones(C, dtype=torch.float64), atol=1e-6, rtol=0)
    off = g[~torch.eye(C, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1.0 / (C - 1)), atol=1e-6, rtol=0)
    # centred: the rows sum to zero, so they span a (C-1)-dimensional subspace
    assert w.double().sum(0).abs().max() < 1e-5
    assert torch.linalg.matrix_rank(w.double(), atol=1e-5) == C - 1


@pytest.mark.parametrize("C,d", [(10, 64), (10, 10), (10, 9), (100, 99)])
def test_etf_is_deterministic_per_seed_and_differs_across_seeds(C, d):
    a, b = etf_directions(C, d, seed=7), etf_directions(C, d, seed=7)
    assert torch.equal(a, b)
    c = etf_directions(C, d, seed=8)
    assert (a - c).abs().max() > 1e-2  # d == C-1 too: the seeded rotation is applied


def test_etf_default_seed_is_zero():
    assert torch.equal(etf_directions(5, 8), etf_directions(5, 8, seed=0))


@pytest.mark.parametrize("C,d", [(10, 8), (100, 64), (3, 1)])
def test_etf_needs_at_least_c_minus_1_dimensions(C, d):
    msg = f"an ETF classifier for {C} classes needs a feature dimension of at least {C - 1}; this backbone gives {d}"
    with pytest.raises(ValueError) as e:
        etf_directions(C, d)
    assert str(e.value) == msg


def test_etf_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        etf_directions(1, 4)


# ------------------------------------------------------------------- measures, by plain loops


def _loop_class_means(f, y):
    """{class: mean} and the global mean, by accumulating one sample at a time."""
    sums, counts = {}, {}
    total = [0.0] * len(f[0])
    for row, c in zip(f, y):
        c = int(c)
        if c not in sums:
            sums[c], counts[c] = [0.0] * len(row), 0
        for j, v in enumerate(row):
            sums[c][j] += float(v)
            total[j] += float(v)
        counts[c] += 1
    means = {c: [s / counts[c] for s in sums[c]] for c in sums}
    return means, counts, [t / len(f) for t in total]


def _loop_fdr(f, y):
    means, counts, mu = _loop_class_means(f, y)
    between = sum(counts[c] * sum((m - g) ** 2 for m, g in zip(means[c], mu)) for c in means)
    within = 0.0
    for row, c in zip(f, y):
        for j, v in enumerate(row):
            within += (float(v) - means[int(c)][j]) ** 2
    return between / within


def _cos(a, b):
    dot = sum(x * z for x, z in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(z * z for z in b)))


def _loop_class_mean_cos(f, y, centred):
    means, _, mu = _loop_class_means(f, y)
    if centred:
        means = {c: [m - g for m, g in zip(means[c], mu)] for c in means}
    vals = [_cos(means[a], means[b]) for a in means for b in means if a != b]  # ordered pairs
    return sum(vals) / len(vals)


def _loop_cone(f):
    mu = [sum(float(row[j]) for row in f) / len(f) for j in range(len(f[0]))]
    vals = [_cos([float(v) for v in row], mu) for row in f]
    return sum(vals) / len(vals)


def _gaussian_classes(seed=0, spread=1.0, noise=None):
    """4 unbalanced Gaussian classes in 5-D around known means, classes 0..4 with class 3 absent."""
    rng = np.random.default_rng(seed)
    means = np.array(
        [
            [3.0, 0.0, 1.0, 0.0, 0.5],
            [0.0, 2.0, 1.0, -1.0, 0.0],
            [1.0, 1.0, -2.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],  # class 3: no samples
            [-1.0, 0.5, 0.0, 2.0, -1.0],
        ]
    )
    counts = {0: 150, 1: 90, 2: 40, 4: 20}
    y = np.concatenate([np.full(n, c) for c, n in counts.items()])
    rng.shuffle(y)
    if noise is None:
        noise = rng.normal(scale=0.8, size=(y.size, 5))
    return spread * means[y] + noise, y, noise


def test_measures_match_plain_loops_on_gaussian_classes():
    f, y, _ = _gaussian_classes()
    assert fisher_ratio(f, y) == pytest.approx(_loop_fdr(f, y), rel=1e-10)
    assert class_mean_cosine(f, y) == pytest.approx(_loop_class_mean_cos(f, y, False), rel=1e-10)
    assert class_mean_cosine(f, y, centred=True) == pytest.approx(_loop_class_mean_cos(f, y, True), rel=1e-10)
    assert cone_cosine(f) == pytest.approx(_loop_cone(f), rel=1e-10)


def test_torch_and_numpy_inputs_agree():
    f, y, _ = _gaussian_classes(seed=1)
    ft, yt = torch.from_numpy(f).float(), torch.from_numpy(y)
    f32 = ft.double().numpy()  # the float32-rounded values, as numpy
    assert fisher_ratio(ft, yt) == pytest.approx(fisher_ratio(f32, y), rel=1e-12)
    assert class_mean_cosine(ft, yt, centred=True) == pytest.approx(class_mean_cosine(f32, y, centred=True), rel=1e-12)
    assert cone_cosine(ft) == pytest.approx(cone_cosine(f32), rel=1e-12)
    nt, nn = class_feature_norms(ft, yt, 5), class_feature_norms(f32, y, 5)
    assert nt[3] is None and nn[3] is None
    present = [c for c in range(5) if c != 3]
    assert [nt[c] for c in present] == pytest.approx([nn[c] for c in present], rel=1e-12)


# Class 0: (2, 1), (2, -1) -> mu_0 = (2, 0); class 1: (1, 2), (-1, 2) -> mu_1 = (0, 2); mu = (1, 1).
TINY_F = np.array([[2.0, 1.0], [2.0, -1.0], [1.0, 2.0], [-1.0, 2.0]])
TINY_Y = np.array([0, 0, 1, 1])


def test_tiny_example_worked_by_hand():
    # tr S_B = 2 ||(1, -1)||^2 + 2 ||(-1, 1)||^2 = 4 + 4 = 8; every point is 1 from its class mean,
    # so tr S_W = 4 * 1 = 4 and FDR = 8 / 4 = 2.
    assert fisher_ratio(TINY_F, TINY_Y) == pytest.approx(2.0, rel=1e-12)
    # mu_0 = (2, 0) and mu_1 = (0, 2) are orthogonal: cosine 0.
    assert class_mean_cosine(TINY_F, TINY_Y) == pytest.approx(0.0, abs=1e-12)
    # centred: mu_0 - mu = (1, -1), mu_1 - mu = (-1, 1), opposite: cosine -1.
    assert class_mean_cosine(TINY_F, TINY_Y, centred=True) == pytest.approx(-1.0, rel=1e-12)
    # cos(f_i, (1, 1)) = f_i . (1, 1) / (sqrt5 sqrt2): (2+1), (2-1), (1+2), (-1+2) = 3, 1, 3, 1
    # over sqrt10; the mean is 2/sqrt10 = 0.6324555320336759.
    assert cone_cosine(TINY_F) == pytest.approx(0.6324555320336759, rel=1e-12)
    # every point has norm sqrt5 = 2.23606797749979; class 2 is absent.
    norms = class_feature_norms(TINY_F, TINY_Y, 3)
    assert norms[:2] == pytest.approx([2.23606797749979] * 2, rel=1e-12) and norms[2] is None


def test_tiny_unbalanced_example_worked_by_hand():
    # Class 0: (0, 0), (2, 0), (4, 0) -> mu_0 = (2, 0); class 1: (0, 3) -> mu_1 = (0, 3).
    # mu = (6, 3) / 4 = (1.5, 0.75).
    # tr S_B = 3 ||(0.5, -0.75)||^2 + 1 ||(-1.5, 2.25)||^2 = 3 * 0.8125 + 7.3125 = 9.75;
    # tr S_W = 4 + 0 + 4 + 0 = 8; FDR = 9.75 / 8 = 1.21875.
    f = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
    y = np.array([0, 0, 0, 1])
    assert fisher_ratio(f, y) == pytest.approx(1.21875, rel=1e-12)
    # cone: the zero feature is skipped; cos with (1.5, 0.75) ~ (2, 1): 2/sqrt5, 2/sqrt5, 1/sqrt5,
    # mean 5 / (3 sqrt5) = sqrt5 / 3 = 0.7453559924999299.
    assert cone_cosine(f) == pytest.approx(0.7453559924999299, rel=1e-12)
    # norms: class 0 (0 + 2 + 4) / 3 = 2, class 1: 3.
    assert class_feature_norms(f, y, 2) == pytest.approx([2.0, 3.0])


def test_fdr_grows_as_the_class_means_move_apart():
    # The same noise draw at every spread, centred within each class so the class means are exactly
    # spread * the known means: tr S_W is unchanged and tr S_B scales with spread^2.
    _, y, noise = _gaussian_classes(seed=2)
    for c in np.unique(y):
        noise[y == c] -= noise[y == c].mean(axis=0)
    fdr = [fisher_ratio(*_gaussian_classes(seed=2, spread=s, noise=noise)[:2]) for s in (0.5, 1, 2, 4)]
    assert fdr[0] < fdr[1] < fdr[2] < fdr[3]
    assert fdr[3] / fdr[1] == pytest.approx(16.0, rel=1e-10)


def test_fdr_is_nan_without_within_class_scatter():
    f = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert math.isnan(fisher_ratio(f, np.array([0, 0, 1])))


def test_orthogonal_class_means_have_cosine_zero():
    # class c: e_c + eps_c and e_c - eps_c (random eps_c), so its mean is exactly e_c
    rng = np.random.default_rng(0)
    eps = rng.normal(scale=0.3, size=(3, 4))
    f = np.concatenate([np.eye(4)[:3] + eps, np.eye(4)[:3] - eps])
    y = np.array([0, 1, 2, 0, 1, 2])
    assert class_mean_cosine(f, y) == pytest.approx(0.0, abs=1e-12)


def test_etf_class_means_have_centred_cosine_minus_one_over_c_minus_one():
    # features equal to the ETF rows, balanced: centred class means are the ETF directions
    w = etf_directions(6, 8, seed=1).double().numpy()
    f = np.repeat(w, 3, axis=0) + 5.0  # an offset: the uncentred cosine is not -1/5, the centred is
    y = np.repeat(np.arange(6), 3)
    assert class_mean_cosine(f, y, centred=True) == pytest.approx(-0.2, abs=1e-6)
    assert class_mean_cosine(f, y) > 0.5


def test_cone_cosine_of_identical_features_is_one():
    v = np.array([0.3, -1.2, 2.0])
    f = np.vstack([v] * 5 + [np.zeros(3)])  # a zero feature is skipped
    assert cone_cosine(f) == pytest.approx(1.0, rel=1e-12)


def test_cone_cosine_is_nan_when_the_mean_is_zero():
    assert math.isnan(cone_cosine(np.array([[1.0, 2.0], [-1.0, -2.0]])))


def test_class_mean_cosine_leaves_out_a_class_whose_mean_has_no_direction():
    # class means (1, 0), (-1, 0), (0, 0); balanced, so mu = 0 and the centred means are the same.
    # Class 2's mean is the zero vector: only the pair (0, 1) counts, cosine -1 (not NaN).
    f = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 2.0], [-1.0, -2.0], [0.0, 3.0], [0.0, -3.0]])
    y = np.array([0, 0, 1, 1, 2, 2])
    assert class_mean_cosine(f, y) == pytest.approx(-1.0, rel=1e-12)
    assert class_mean_cosine(f, y, centred=True) == pytest.approx(-1.0, rel=1e-12)


def test_class_mean_cosine_needs_two_classes():
    assert math.isnan(class_mean_cosine(np.ones((3, 2)), np.array([1, 1, 1])))


# ---------------------------------------------------------------- norms and Spearman


def test_class_feature_norms_by_hand():
    # class 0: ||(3, 4)|| = 5, ||(0, 1)|| = 1 -> 3; class 1 absent;
    # class 2: 0 and ||(6, 8)|| = 10 -> 5
    f = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 1.0], [6.0, 8.0]])
    y = torch.tensor([0, 2, 0, 2])
    assert class_feature_norms(f, y, 3) == [3.0, None, 5.0]


def test_class_feature_norms_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="out of range"):
        class_feature_norms(np.ones((2, 2)), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="0..C-1"):
        class_feature_norms(np.ones((2, 2)), np.array([0, -1]), 3)


def test_spearman_of_monotone_values_is_plus_or_minus_one():
    counts = [500, 200, 80, 30, 10]
    assert norm_count_spearman([5.0, 4.1, 3.0, 2.2, 1.9], counts) == pytest.approx(1.0)
    assert norm_count_spearman([1.0, 1.5, 2.0, 2.1, 9.0], counts) == pytest.approx(-1.0)


def test_spearman_drops_absent_classes_and_is_nan_when_undefined():
    counts = [500, 200, 80, 30]
    assert norm_count_spearman([4.0, None, 2.0, 1.0], counts) == pytest.approx(1.0)
    assert norm_count_spearman([4.0, float("nan"), 2.0, 1.0], counts) == pytest.approx(1.0)
    assert math.isnan(norm_count_spearman([4.0, None, None, 1.0], counts))  # 2 classes left
    assert math.isnan(norm_count_spearman([2.0, 1.0], [5, 3]))
    assert math.isnan(norm_count_spearman([3.0, 3.0, 3.0, 3.0], counts))  # constant values
    assert math.isnan(norm_count_spearman([1.0, 2.0, 3.0], [7, 7, 7]))  # constant counts
    # equal up to float rounding (e.g. L2-normalised features): ranks of noise, not a correlation
    assert math.isnan(norm_count_spearman([1.0, 1.0 + 1e-13, 1.0 - 1e-13], [9, 5, 1]))


def test_feature_summary_is_json_friendly_and_matches_the_parts():
    f, y, _ = _gaussian_classes(seed=4)
    counts = [150, 90, 40, 0, 20]
    # make the norms follow class size: scale each class's features by its count
    f = f * (1 + np.array(counts, dtype=float)[y, None] / 10)
    s = feature_summary(torch.from_numpy(f), torch.from_numpy(y), counts)
    assert set(s) == {
        "fdr",
        "class_mean_cos",
        "class_mean_cos_centred",
        "cone_cos",
        "feature_norms",
        "feature_norm_spearman",
    }
    assert s["fdr"] == fisher_ratio(f, y)
    assert s["class_mean_cos"] == class_mean_cosine(f, y)
    assert s["class_mean_cos_centred"] == class_mean_cosine(f, y, centred=True)
    assert s["cone_cos"] == cone_cosine(f)
    assert s["feature_norms"] == class_feature_norms(f, y, 5) and s["feature_norms"][3] is None
    assert s["feature_norm_spearman"] == pytest.approx(1.0)
    for k, v in s.items():
        assert type(v) is (list if k == "feature_norms" else float)
    json.dumps(s)


def test_numpy_spearman_equals_scipy_with_ties_and_constant_input():
    """study.training.evaluation.spearman (numpy, no scipy import) gives scipy.stats.spearmanr's rho, ties
    ranked by their average, and NaN for a constant side."""
    import numpy as np
    from scipy.stats import spearmanr

    from study.training.evaluation import spearman

    rng = np.random.default_rng(0)
    for i in range(300):
        n = int(rng.integers(3, 30))
        x = rng.integers(0, 5, n).astype(float)  # many ties
        y = rng.normal(size=n) if i % 2 else rng.integers(0, 3, n).astype(float)
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            assert math.isnan(spearman(x, y))
            continue
        assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
