"""Losses: cross-entropy and the class-balanced loss in its two forms (docs/reference.md §5.1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def class_balanced_weights(counts: Sequence[int], beta: float) -> torch.Tensor:
    """Cui et al.'s weights: w_c proportional to 1/E_c with E_c = (1 - beta^n_c)/(1 - beta), scaled so
    that sum_c w_c = C. beta = 1 is the limit E_c = n_c (inverse frequency).

    For CIFAR-100-LT IF 100 and beta 0.9999 they run from 0.0449 (n = 500) to 4.378 (n = 5).
    """
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    if beta >= 1.0:
        effective = n
    else:
        effective = (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n)) / (1.0 - beta)
    w = 1.0 / effective.clamp_min(1e-12)
    return (w / w.sum() * len(n)).float()


def weighted_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """mean_i w_{y_i} * CE(logits_i, y_i); plain CE without weights.

    Note: this is a mean over the batch, *not* PyTorch's ``cross_entropy(weight=...)`` which divides
    by the sum of the batch's weights; the ICLR'24 code uses the mean, and so do we.
    """
    ce = F.cross_entropy(logits.float(), y, reduction="none")
    if class_weights is None:
        return ce.mean()
    return (class_weights[y] * ce).mean()


def cb_bce_softmax(logits: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """The WB code's "softmax" CB loss (from vandit15/Class-balanced-loss-pytorch): binary
    cross-entropy between softmax(logits) and the one-hot target, each row weighted by w_{y_i},
    averaged over all B x C entries. Kept for parity; it is not a weighted softmax cross-entropy."""
    p = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(y, logits.shape[1]).float()
    w = class_weights[y].unsqueeze(1).expand_as(p)
    return F.binary_cross_entropy(p, onehot, weight=w)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(kind: str, counts: Sequence[int], beta: float, form: str, device) -> LossFn:
    """The training loss for a stage: ``ce``, or ``cb`` with ``form`` ``weighted-ce`` | ``bce``."""
    if kind == "ce":
        return lambda logits, y: weighted_cross_entropy(logits, y)
    if kind != "cb":
        raise ValueError(f"unknown loss {kind!r}")
    w = class_balanced_weights(counts, beta).to(device)
    if form == "bce":
        return lambda logits, y: cb_bce_softmax(logits, y, w)
    return lambda logits, y: weighted_cross_entropy(logits, y, w)
