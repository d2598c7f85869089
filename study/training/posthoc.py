"""The stage-2 methods that do not train: plain functions of the frozen stage-1 classifier (W, b)
and cached features.

- ``identity`` (``none``): the stage-1 classifier;
- ``tau-norm`` (``l2-norm`` is tau = 1): w_c / ||w_c||^tau, the bias dropped or kept (``posthoc_bias``);
- ``la-add``: z_c - tau log pi_c (Menon et al.), i.e. the bias shifted by -tau log pi_c;
- ``la-mul``: z_c * pi_c^(-tau) (Hasegawa & Sato), i.e. W and b scaled row-wise by pi_c^(-tau);
- ``ncm``: nearest class mean of centred, L2-normalised training features, as an affine head
  (see :class:`study.training.heads.AffineHead`).

pi_c = n_c / N are the training priors. Where tau is not fixed, every value of the grid
(``Stage2Config.tau_grid``) is evaluated on the selection split and the best kept; ties keep the
smallest tau (the least change to the classifier).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from study.config.methods import Method, MethodInputs
from study.training.evaluation import accuracy_report, balance_stats, summarize
from study.training.heads import AffineHead
from study.training.regularizers import row_norms, tau_normalize


def candidate_heads(
    method: Method,
    cfg,
    W: torch.Tensor,
    b: torch.Tensor,
    priors,
    train_feats: torch.Tensor | None = None,
    train_y: torch.Tensor | None = None,
    num_classes: int = 0,
    counts=(),
    seed: int = 0,
) -> list[tuple[float | None, AffineHead]]:
    """(tau, head) for every tau the method tries (tau None for methods without one)."""
    W, b = W.float(), b.float()
    if method.kind == "identity":
        return [(None, AffineHead(W, b))]
    if method.kind == "custom":
        return [(None, custom_head(method, cfg, W, b, train_feats, train_y, counts, seed))]
    if method.kind == "ncm":
        mu = train_feats.mean(0)
        z = F.normalize(train_feats - mu, dim=1)
        means = torch.stack([z[train_y == c].mean(0) for c in range(num_classes)])
        return [(None, AffineHead(means, -0.5 * means.pow(2).sum(1), center=mu, l2=True))]
    log_prior = torch.as_tensor(np.log(priors), dtype=torch.float32, device=W.device)
    out = []
    for tau in cfg.tau_grid():
        if method.transform == "tau-norm":
            bias = b if cfg.posthoc_bias == "keep" else torch.zeros_like(b)
            head = AffineHead(tau_normalize(W, tau), bias)
        elif method.transform == "la-add":
            head = AffineHead(W, b - tau * log_prior)
        elif method.transform == "la-mul":
            s = torch.exp(-tau * log_prior)  # pi_c^(-tau)
            head = AffineHead(W * s[:, None], b * s)
        else:
            raise ValueError(f"unknown post-hoc transform {method.transform!r}")
        out.append((tau, head))
    return out


def custom_head(method: Method, cfg, W, b, train_feats, train_y, counts, seed: int) -> AffineHead:
    """The head a plug-in method's ``fit`` returns, checked: (weight C x D, bias C), finite."""
    from study.config.registry import resolve

    inputs = MethodInputs(W, b, train_feats, train_y, tuple(int(c) for c in counts), cfg, int(seed))
    out = resolve(method.fit)(inputs)
    ok = isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)
    if not ok or tuple(out[0].shape) != tuple(W.shape) or tuple(out[1].shape) != tuple(b.shape):
        if isinstance(out, (tuple, list)):
            got = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in out)
        else:
            got = type(out).__name__
        raise TypeError(
            f"stage-2 method '{method.name}': fit must return (weight {tuple(W.shape)}, bias {tuple(b.shape)}) "
            f"tensors, got {got}"
        )
    w, bias = (t.detach().float().to(W.device) for t in out)
    if not (torch.isfinite(w).all() and torch.isfinite(bias).all()):
        raise FloatingPointError(f"stage-2 method '{method.name}': fit returned non-finite values")
    return AffineHead(w, bias)


def choose(candidates: list[tuple[float | None, AffineHead]], feats: torch.Tensor, labels, report_of):
    """The candidate with the best selection accuracy: (tau, head, report, tau curve)."""
    best = None
    curve: list[list[float]] = []
    for tau, head in candidates:
        with torch.no_grad():
            preds = head(feats).argmax(1).cpu().numpy()
        report = report_of(preds, labels)
        if tau is not None:
            curve.append([tau, report["all"]])
        # strict '>' keeps the smallest tau among ties
        if best is None or report["all"] > best[2]["all"]:
            best = (tau, head, report)
    return best[0], best[1], best[2], curve


def fit_posthoc(
    cfg,
    method: Method,
    data,
    seed: int,
    W: torch.Tensor,
    b: torch.Tensor,
    select_feats: torch.Tensor,
    select_y,
    train_feats: torch.Tensor | None = None,
    train_y: torch.Tensor | None = None,
) -> dict:
    """A post-hoc method's result for one seed, in the shape of a trained stage-2 result (one
    'epoch', the chosen head as ``state["head"]``)."""

    def report_of(preds, labels):
        return accuracy_report(preds, labels, data.train_counts, data.many_threshold, data.few_threshold)

    cands = candidate_heads(
        method, cfg, W, b, data.priors(), train_feats, train_y, data.num_classes, data.train_counts, seed
    )
    tau, head, report, curve = choose(cands, select_feats, select_y, report_of)
    state = {"head": head.to_state()}
    norms = [float(v) for v in row_norms(state["head"]["weight"]).flatten()]
    history = [
        {
            "epoch": 1,
            "train_loss": math.nan,
            "lr": 0.0,
            "tau": tau,
            **{f"sel_{k}": v for k, v in summarize(report).items()},
        }
    ]
    return {
        "stage": "stage2",
        "method": method.name,
        "seed": int(seed),
        "best_epoch": 1,
        "epochs_run": 1,
        "selection": report,
        "weight_norms": norms,
        "balance": balance_stats(norms, data.train_counts),
        "maxnorm_radius": None,
        "tau": tau,
        "tau_curve": curve,
        "history": history,
        "state": state,
    }
