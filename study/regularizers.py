"""Weight-balancing regularizers on the classifier rows: MaxNorm by projected gradient descent,
and the L2 / tau normalisation used by the post-hoc methods (reference.md §5)."""

from __future__ import annotations

import torch


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each class's weight row (a C-vector)."""
    return weight.detach().float().norm(dim=1)


def maxnorm_radius(weight: torch.Tensor, threshold: float, mode: str = "relative") -> float:
    """The MaxNorm radius r.

    ``relative`` (the WB definition): r = min_c ||w_c|| + t (max_c ||w_c|| - min_c ||w_c||) over the
    rows at the start of the stage. The radius is relative because raw norms depend on the backbone,
    the initialisation and the dataset; t in [0, 1] means the same thing everywhere (0: the smallest
    initial row, 1: the largest, so nothing is ever clipped at t = 1 before training).
    ``absolute``: r = t.
    """
    if mode == "absolute":
        return float(threshold)
    n = row_norms(weight)
    lo, hi = float(n.min()), float(n.max())
    return lo + float(threshold) * (hi - lo)


@torch.no_grad()
def project_rows_(weight: torch.Tensor, radius: float) -> torch.Tensor:
    """Project every row onto the ball of radius ``radius`` in place: w_c <- w_c * min(1, r/||w_c||).
    Rows inside the ball are untouched. Returns the per-row scale applied."""
    norms = weight.float().norm(dim=1, keepdim=True)
    scale = (radius / norms.clamp_min(1e-30)).clamp(max=1.0)
    weight.mul_(scale.to(weight.dtype))
    return scale.flatten()


class MaxNorm:
    """MaxNorm constraint on a weight matrix: radius fixed once from the initial rows, projection
    applied after every SGD step or once per epoch (``pgd_every``)."""

    def __init__(self, weight: torch.Tensor, threshold: float, mode: str = "relative", every: str = "step"):
        self.radius = maxnorm_radius(weight, threshold, mode)
        self.every = every

    def after_step(self, weight: torch.Tensor) -> None:
        if self.every == "step":
            project_rows_(weight, self.radius)

    def after_epoch(self, weight: torch.Tensor) -> None:
        if self.every == "epoch":
            project_rows_(weight, self.radius)


def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """w_c / ||w_c||^tau (Kang et al.): tau = 0 leaves the weights unchanged, tau = 1 gives unit rows
    (L2 normalisation)."""
    norms = weight.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return weight / norms.pow(tau).to(weight.dtype)
