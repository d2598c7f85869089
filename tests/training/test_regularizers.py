"""MaxNorm by projection, its relative radius, and tau-normalisation (docs/reference.md §5.1-5.2)."""

from __future__ import annotations

import pytest
import torch

from study.training.regularizers import MaxNorm, maxnorm_radius, project_rows_, row_norms, tau_normalize


def _random_matrix(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(2, 40, (1,), generator=g))
    cols = int(torch.randint(1, 70, (1,), generator=g))
    # rows with very different norms, as a long-tailed classifier has
    scales = torch.exp(torch.randn(rows, 1, generator=g) * 1.5)
    return torch.randn(rows, cols, generator=g) * scales


@pytest.mark.parametrize("seed", range(40))
def test_projection_invariant_over_random_matrices(seed):
    w = _random_matrix(seed)
    norms = row_norms(w)
    g = torch.Generator().manual_seed(1000 + seed)
    t = float(torch.rand((), generator=g))
    radius = maxnorm_radius(w, t)
    w0 = w.clone()
    scale = project_rows_(w, radius)
    after = w.norm(dim=1)
    assert torch.all(after <= radius * (1 + 1e-6))
    inside = norms <= radius
    assert torch.equal(w[inside], w0[inside])  # rows in the ball: untouched, bit for bit
    assert torch.equal(scale[inside], torch.ones(int(inside.sum())))
    outside = ~inside
    if outside.any():  # rows outside: on the sphere, same direction
        torch.testing.assert_close(after[outside], torch.full((int(outside.sum()),), radius), rtol=1e-5, atol=0)
        cos = torch.nn.functional.cosine_similarity(w[outside], w0[outside], dim=1)
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-5)
    # projecting again changes (almost) nothing
    w1 = w.clone()
    project_rows_(w, radius)
    torch.testing.assert_close(w, w1, rtol=1e-6, atol=0)


def test_relative_radius_definition():
    w = torch.diag(torch.tensor([1.0, 2.0, 5.0]))  # row norms 1, 2, 5
    assert maxnorm_radius(w, 0.0) == pytest.approx(1.0)
    assert maxnorm_radius(w, 1.0) == pytest.approx(5.0)
    assert maxnorm_radius(w, 0.25) == pytest.approx(1.0 + 0.25 * 4.0)
    assert maxnorm_radius(w, 0.7, "absolute") == pytest.approx(0.7)
    for seed in range(10):
        m = _random_matrix(seed)
        n = row_norms(m)
        assert maxnorm_radius(m, 0.0) == pytest.approx(float(n.min()), rel=1e-6)
        assert maxnorm_radius(m, 1.0) == pytest.approx(float(n.max()), rel=1e-6)
        assert maxnorm_radius(m, 0.3) == pytest.approx(float(n.min() + 0.3 * (n.max() - n.min())), rel=1e-6)


def test_t_zero_clips_every_row_to_the_smallest_and_t_one_clips_nothing():
    w = _random_matrix(3)
    n = row_norms(w)
    w_all = w.clone()
    project_rows_(w_all, maxnorm_radius(w_all, 0.0))
    torch.testing.assert_close(row_norms(w_all), torch.full_like(n, float(n.min())), rtol=1e-5, atol=0)
    w_none = w.clone()
    project_rows_(w_none, maxnorm_radius(w_none, 1.0))
    assert torch.equal(w_none, w)


def test_maxnorm_step_and_epoch_modes():
    w = torch.diag(torch.tensor([1.0, 2.0, 5.0]))
    step = MaxNorm(w, 0.25, every="step")  # radius 2
    assert step.radius == pytest.approx(2.0)
    big = w * 3
    step.after_epoch(big)
    assert torch.equal(big, w * 3)  # step mode ignores the epoch hook
    step.after_step(big)
    assert torch.all(row_norms(big) <= 2.0 * (1 + 1e-6))
    epoch = MaxNorm(w, 0.25, every="epoch")
    big = w * 3
    epoch.after_step(big)
    assert torch.equal(big, w * 3)
    epoch.after_epoch(big)
    assert torch.all(row_norms(big) <= 2.0 * (1 + 1e-6))
    # the radius is fixed at construction: later weights do not move it
    assert epoch.radius == pytest.approx(2.0)


def test_tau_normalize():
    w = _random_matrix(5)
    assert torch.equal(tau_normalize(w, 0), w)
    assert torch.equal(tau_normalize(w, 0.0), w)
    torch.testing.assert_close(row_norms(tau_normalize(w, 1.0)), torch.ones(w.shape[0]))
    n = row_norms(w)
    torch.testing.assert_close(tau_normalize(w, 1.9), w / n[:, None] ** 1.9)
    torch.testing.assert_close(row_norms(tau_normalize(w, 0.5)), n.sqrt())
