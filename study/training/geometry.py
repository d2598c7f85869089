"""A fixed simplex-ETF classifier, and measures of penultimate-feature geometry.

Hasegawa & Sato (ICLR 2024, *Exploring weight balancing on long-tailed recognition problem*)
explain why the two-stage weight-balancing recipe works through the geometry of the stage-1
features; these functions measure that geometry so a study can report it next to accuracy.

- **Simplex ETF** (:func:`etf_directions`): C unit vectors with every pairwise cosine equal to
  -1/(C-1), the most spread-out arrangement of C directions (Papyan et al., 2020: the limit that
  neural collapse converges to). Fixing the classifier rows to it removes the classifier's freedom
  to grow the weights of frequent classes, so every class gets an equally large, equally separated
  direction.
- **Fisher discriminant ratio** (:func:`fisher_ratio`): tr S_B / tr S_W, between-class over
  within-class scatter. Hasegawa & Sato show that weight decay with cross-entropy in stage 1 raises
  it: the features of one class crowd together relative to the distance between classes, which is
  what makes a re-trained linear classifier work in stage 2.
- **Inter-class cosine** (:func:`class_mean_cosine`): the mean cosine between class means. Weight
  decay lowers it (the class means spread apart in angle); uncentred, it also shows the cone effect
  of non-negative (post-ReLU) features, centred it is the quantity an ETF pins at -1/(C-1).
- **Cone effect** (:func:`cone_cosine`): the mean cosine of each feature with the global mean. Near
  1 all features point the same way (ReLU features live in one orthant), which limits how far apart
  classes can be in angle.
- **Feature norms per class** (:func:`class_feature_norms`, :func:`norm_count_spearman`): under
  imbalance the features of frequent classes tend to have larger norms, like the classifier weights
  in WB's Fig. 2; the Spearman rho between class count and mean norm says how strongly.

Every measure takes features ``f`` (N x d, a torch tensor or a numpy array) and integer labels ``y``
(N,) in 0..C-1, and computes in float64 numpy. A class with no sample in ``y`` is *skipped*: it has
no mean, so it contributes no term to any sum or pair (``class_feature_norms`` reports it as None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used, so the measures alone never load it
    import torch

_ETF_DIM_ERROR = (
    "an ETF classifier for {C} classes needs a feature dimension of at least {Cm1}; this backbone gives {d}"
)


def _haar_orthogonal(n: int, generator):
    """A Haar-distributed n x n orthogonal matrix (float64) drawn from ``generator``.

    QR of a Gaussian matrix alone is not Haar: its Q depends on the sign convention of the QR
    routine. Multiplying column j by sign(R_jj) makes R's diagonal positive, which makes the
    factorisation unique, so Q is Haar-distributed and the same on every platform for a seed."""
    import torch

    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    s = torch.sign(torch.diagonal(r))
    s = torch.where(s == 0, torch.ones_like(s), s)  # a zero pivot (probability 0) keeps its column
    return q * s


def etf_directions(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """The rows of a fixed simplex-ETF classifier: a C x d float32 tensor whose rows have unit norm
    and pairwise cosine exactly -1/(C-1) (to float rounding), and sum to zero.

    With d >= C: M = sqrt(C/(C-1)) U (I - 11^T/C), U the first C columns of a seeded Haar-random
    d x d orthogonal matrix, and the weight is W = M^T. With d == C - 1 (the smallest dimension that
    holds C such directions) U cannot have C orthonormal columns, so the frame is built inside the
    centred space {x in R^C : 1^T x = 0}: with B a fixed orthonormal basis of it (C x (C-1)), the
    rows of sqrt(C/(C-1)) (I - 11^T/C) B, rotated by a seeded Haar-random (C-1) x (C-1) orthogonal
    matrix. Both are computed in float64; the same ``seed`` gives the same frame.

    Raises ValueError when d < C - 1 (no such frame exists) or C < 2.
    """
    import torch

    C, d = int(num_classes), int(dim)
    if C < 2:
        raise ValueError(f"an ETF classifier needs at least 2 classes, got {C}")
    if d < C - 1:
        raise ValueError(_ETF_DIM_ERROR.format(C=C, Cm1=C - 1, d=d))
    gen = torch.Generator().manual_seed(int(seed))
    centring = torch.eye(C, dtype=torch.float64) - torch.full((C, C), 1.0 / C, dtype=torch.float64)
    scale = math.sqrt(C / (C - 1))
    if d >= C:
        u = _haar_orthogonal(d, gen)[:, :C]  # d x C, orthonormal columns
        w = (scale * u @ centring).T  # W = M^T
    else:
        # Any C-1 columns of I - 11^T/C are linearly independent and lie in the centred space, so
        # their QR gives an orthonormal basis of it; the sign fix makes it deterministic.
        b, r = torch.linalg.qr(centring[:, : C - 1])
        s = torch.sign(torch.diagonal(r))
        b = b * torch.where(s == 0, torch.ones_like(s), s)
        # (I - 11^T/C) B = B as B's columns are centred; the product is kept to mirror the formula.
        w = scale * centring @ b @ _haar_orthogonal(d, gen)
    return w.to(torch.float32).contiguous()


def _features(f) -> np.ndarray:
    """Features as a float64 N x d numpy array (a torch tensor is detached and moved to the CPU)."""
    if hasattr(f, "detach"):
        f = f.detach().cpu().double().numpy()
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be an N x d array, got shape {f.shape}")
    return f


def _labels(y, n: int) -> np.ndarray:
    """Labels as an int64 numpy array of length n, checked to be non-negative integers."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must be a vector of {n} entries (one per feature), got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"labels must be class indices 0..C-1, got {int(y.min())}")
    return y


def _class_stats(f, y):
    """(features, class indices present, counts of those classes, their means (K x d), the inverse
    map from sample to row of the means)."""
    f = _features(f)
    y = _labels(y, f.shape[0])
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    sums = np.zeros((classes.size, f.shape[1]))
    np.add.at(sums, inverse, f)
    means = sums / counts[:, None]
    return f, classes, counts, means, inverse


def fisher_ratio(f, y) -> float:
    """Fisher discriminant ratio tr(S_B) / tr(S_W) of features ``f`` with labels ``y``.

    tr S_B = sum_c n_c ||mu_c - mu||^2 (mu the global mean, mu_c the class means) and
    tr S_W = sum_i ||f_i - mu_{y_i}||^2; only the traces are formed, never the d x d matrices.
    Absent classes are skipped. NaN when tr S_W == 0 (every feature equals its class mean) or there
    are no features."""
    f, _, counts, means, inverse = _class_stats(f, y)
    if f.shape[0] == 0:
        return math.nan
    mu = f.mean(axis=0)
    between = float(np.sum(counts * np.sum((means - mu) ** 2, axis=1)))
    # The direct sum of squared deviations, not sum ||f_i||^2 - n_c ||mu_c||^2: the latter cancels
    # catastrophically when the classes are tight relative to their distance from the origin.
    within = float(np.sum((f - means[inverse]) ** 2))
    return between / within if within > 0 else math.nan


def _mean_pairwise_cosine(vectors: np.ndarray) -> float:
    """Mean cosine over unordered pairs of distinct rows; zero-norm rows are left out (their
    direction is undefined). NaN when fewer than two rows remain."""
    norms = np.linalg.norm(vectors, axis=1)
    v = vectors[norms > 0] / norms[norms > 0, None]
    k = v.shape[0]
    if k < 2:
        return math.nan
    gram = v @ v.T
    return float(gram[np.triu_indices(k, 1)].mean())


def class_mean_cosine(f, y, centred: bool = False) -> float:
    """Mean cosine between the class means, over unordered pairs of distinct present classes
    (ordered pairs give the same value: the cosine is symmetric).

    With ``centred`` the cosine is of mu_c - mu and mu_c' - mu (mu the global mean over all samples,
    so the frequent classes weigh more in it); a simplex ETF gives -1/(C-1) there. A class whose
    (centred) mean is the zero vector has no direction and is left out. NaN when fewer than two
    classes remain."""
    f, _, _, means, _ = _class_stats(f, y)
    if centred and f.shape[0]:
        means = means - f.mean(axis=0)
    return _mean_pairwise_cosine(means)


def cone_cosine(f) -> float:
    """The cone effect: the mean over samples of cos(f_i, mu), mu the mean of all features.

    1 when every feature points the same way. Zero-norm features have no direction and are skipped
    (they still count in mu, where they add nothing). NaN when mu is zero or no feature is
    nonzero."""
    f = _features(f)
    if f.shape[0] == 0:
        return math.nan
    mu = f.mean(axis=0)
    mu_norm = float(np.linalg.norm(mu))
    norms = np.linalg.norm(f, axis=1)
    keep = norms > 0
    if mu_norm == 0 or not keep.any():
        return math.nan
    return float(np.mean((f[keep] @ mu) / (norms[keep] * mu_norm)))


def class_feature_norms(f, y, num_classes: int) -> list:
    """Mean feature norm ||f_i|| of each class 0..num_classes-1 (None for a class absent from
    ``y``). Raises ValueError for a label >= num_classes."""
    f = _features(f)
    y = _labels(y, f.shape[0])
    if y.size and y.max() >= num_classes:
        raise ValueError(f"label {int(y.max())} is out of range for {num_classes} classes")
    norms = np.linalg.norm(f, axis=1)
    total = np.bincount(y, weights=norms, minlength=num_classes)
    count = np.bincount(y, minlength=num_classes)
    return [float(total[c] / count[c]) if count[c] else None for c in range(num_classes)]


def norm_count_spearman(norms: Sequence, counts: Sequence) -> float:
    """Spearman rank correlation between per-class values (e.g. mean feature norms) and class
    counts.

    +1: the frequent classes have the larger values. Classes whose value is None or NaN (absent
    from the evaluated split) are dropped. NaN when fewer than 3 classes remain or either side is
    constant — including values equal up to float rounding (relative spread < 1e-9), whose ranks
    would be noise, as in :func:`study.training.evaluation.balance_stats`."""
    from study.training.evaluation import spearman

    if len(norms) != len(counts):
        raise ValueError(f"{len(norms)} values for {len(counts)} class counts")
    pairs = [(float(v), float(c)) for v, c in zip(norms, counts) if v is not None and not math.isnan(float(v))]
    if len(pairs) < 3:
        return math.nan
    v = np.array([p[0] for p in pairs])
    c = np.array([p[1] for p in pairs])

    def constant(a: np.ndarray) -> bool:
        return np.ptp(a) <= 1e-9 * np.max(np.abs(a))

    if constant(v) or constant(c):
        return math.nan
    return spearman(c, v)


def feature_summary(f, y, counts: Sequence[int]) -> dict:
    """All the feature-geometry measures of ``f`` / ``y`` in one JSON-friendly dict (plain floats,
    NaN where a measure is undefined; ``feature_norms`` is a list with None for absent classes).

    ``counts`` are the per-class training counts (its length is the number of classes); the norm
    Spearman rho is between them and the per-class mean feature norms."""
    f = _features(f)  # once, so a GPU tensor crosses to the CPU once
    y = _labels(y, f.shape[0])
    norms = class_feature_norms(f, y, len(counts))
    return {
        "fdr": fisher_ratio(f, y),
        "class_mean_cos": class_mean_cosine(f, y),
        "class_mean_cos_centred": class_mean_cosine(f, y, centred=True),
        "cone_cos": cone_cosine(f),
        "feature_norms": norms,
        "feature_norm_spearman": norm_count_spearman(norms, counts),
    }
