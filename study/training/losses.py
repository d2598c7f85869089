"""Losses: cross-entropy, the class-balanced loss in its two forms (docs/reference.md §5.1), and the
standard long-tailed losses as their original code computes them (docs/reference.md §10): focal
(LDAM-DRW's softmax focal), LDAM, Balanced Softmax, the logit-adjusted loss, and deferred
re-weighting (DRW) for any of them but ``cb``."""

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


def cb_sigmoid(
    logits: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor, gamma: float | None = None
) -> torch.Tensor:
    """Cui et al.'s class-balanced sigmoid loss (``gamma`` None) or sigmoid focal loss, as their
    TensorFlow code computes it: per-entry binary cross-entropy with logits against the one-hot
    target, times the modulator (1 - p_t)^gamma in its stable form exp(-gamma t z - gamma log(1 +
    e^-z)), times w_{y_i} on every entry of the row, summed and divided by the batch size."""
    z = logits.float()
    onehot = F.one_hot(y, z.shape[1]).float()
    bce = F.binary_cross_entropy_with_logits(z, onehot, reduction="none")
    if gamma:
        bce = torch.exp(-gamma * onehot * z - gamma * torch.log1p(torch.exp(-z))) * bce
    return (class_weights[y].unsqueeze(1) * bce).sum() / onehot.sum()


def focal_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float, weight: torch.Tensor | None = None):
    """LDAM-DRW's ``FocalLoss`` (the softmax focal loss, no alpha): ce_i = CE(z_i, y_i), scaled by
    w_{y_i} when there are weights, p_i = exp(-ce_i), loss = mean_i (1 - p_i)^gamma * ce_i. With
    weights p_i is exp(-w ce), not the model's probability: their code's choice, kept."""
    ce = F.cross_entropy(logits.float(), y, reduction="none", weight=weight)
    p = torch.exp(-ce)
    return ((1 - p) ** gamma * ce).mean()


def ldam_margins(counts: Sequence[int], max_m: float) -> torch.Tensor:
    """LDAM's per-class margins m_c proportional to n_c^(-1/4), scaled so that the largest is
    ``max_m`` (float32, as their code)."""
    m = 1.0 / torch.sqrt(torch.sqrt(torch.as_tensor(list(counts), dtype=torch.float64)))
    return (m * (max_m / m.max())).float()


def ldam_loss(
    logits: torch.Tensor, y: torch.Tensor, margins: torch.Tensor, s: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """LDAM-DRW's ``LDAMLoss``: the true class's logit minus its margin, all logits times s, then
    cross-entropy (PyTorch's weighted mean, sum w_y l / sum w_y, when there are weights)."""
    z = logits.float()
    onehot = F.one_hot(y, z.shape[1]).bool()
    shifted = torch.where(onehot, z - margins[y].unsqueeze(1), z)
    return F.cross_entropy(s * shifted, y, weight=weight)


def log_prior_shift(counts: Sequence[int], tau: float) -> torch.Tensor:
    """log(pi_c^tau + 1e-12), pi = n / N: the logit-adjusted loss's shift as its code computes it
    (pi^tau + 1e-12 in float64, cast to float32, then the log)."""
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    return torch.log((torch.pow(n / n.sum(), tau) + 1e-12).float())


class Loss:
    """A stage's training loss, ``loss(logits, y, epoch)``: the epoch (0-based) matters only with
    deferred re-weighting, whose class-balanced weights apply from ``drw_epoch`` on."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
        drw_weights: torch.Tensor | None = None,
        drw_epoch: int | None = None,
    ):
        self.fn = fn
        self.drw_weights = drw_weights
        self.drw_epoch = drw_epoch

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        deferred = self.drw_epoch is not None and epoch >= self.drw_epoch
        return self.fn(logits, y, self.drw_weights if deferred else None)


# --- the built-in losses' factories (registered by name in study.config.schema) -------------------------------
# Each is make(cfg, counts, device) -> fn(logits, y, weights), the protocol of study.register_loss.


def make_ce(cfg, counts, device):
    # plain CE exactly as before; with DRW's weights, PyTorch's weighted mean as LDAM-DRW's code
    return lambda z, y, w: weighted_cross_entropy(z, y) if w is None else F.cross_entropy(z.float(), y, weight=w)


def make_cb(cfg, counts, device):
    w = class_balanced_weights(counts, cfg.cb_beta).to(device)
    if cfg.cb_form == "bce":
        return lambda z, y, _: cb_bce_softmax(z, y, w)
    if cfg.cb_form in ("sigmoid", "focal"):
        gamma = cfg.focal_gamma if cfg.cb_form == "focal" else None
        return lambda z, y, _: cb_sigmoid(z, y, w, gamma)
    return lambda z, y, _: weighted_cross_entropy(z, y, w)


def make_focal(cfg, counts, device):
    return lambda z, y, w: focal_loss(z, y, cfg.focal_gamma, w)


def make_ldam(cfg, counts, device):
    m = ldam_margins(counts, cfg.ldam_max_m).to(device)
    if getattr(cfg, "classifier", "linear") == "normed":
        # the model's logits are cosine_scale * cos; LDAM's margins and s apply to the cosines
        scale = cfg.cosine_scale
        return lambda z, y, w: ldam_loss(z / scale, y, m, cfg.ldam_s, w)
    return lambda z, y, w: ldam_loss(z, y, m, cfg.ldam_s, w)


def make_balanced_softmax(cfg, counts, device):
    # log n_c; the LA loss's log(pi_c^tau + 1e-12) at tau = 1 differs by a constant per row, which
    # softmax cross-entropy ignores
    shift = torch.log(torch.as_tensor(list(counts), dtype=torch.float32)).to(device)
    return lambda z, y, w: F.cross_entropy(z.float() + shift, y, weight=w)


def make_la_loss(cfg, counts, device):
    shift = log_prior_shift(counts, cfg.la_tau).to(device)
    return lambda z, y, w: F.cross_entropy(z.float() + shift, y, weight=w)


def make_loss(cfg, counts: Sequence[int], device) -> Loss:
    """The training loss a stage's configuration names (``loss``, built-in or a plug-in's; the
    built-ins read ``cb_beta``/``cb_form``, ``focal_gamma``, ``ldam_max_m``/``ldam_s``, ``la_tau``),
    with deferred re-weighting from ``drw_epoch`` on."""
    from study.config.registry import LOSSES, resolve

    fn = resolve(LOSSES[cfg.loss].make)(cfg, list(counts), device)
    drw = getattr(cfg, "drw_epoch", None)
    weights = class_balanced_weights(counts, cfg.cb_beta).to(device) if drw is not None else None
    return Loss(fn, weights, drw)
