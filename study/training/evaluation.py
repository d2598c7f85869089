"""Accuracy by class and by Many / Medium / Few group, and classifier weight-norm balance.

Definitions (docs/reference.md §2, the OLTR ``shot_acc`` used by all three reference repos):
- per-class accuracy on a balanced split;
- **All** = the mean of the per-class accuracies (balanced accuracy; on a balanced test set it
  equals plain accuracy);
- **Many / Medium / Few** = the unweighted mean of per-class accuracy over classes with more than
  ``many`` / between (inclusive) / fewer than ``few`` *training* images. An empty group is reported
  as NaN (the reference prints 0, which reads like a real zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from study.config.groups import shot_groups


def accuracy_report(preds, labels, train_counts: Sequence[int], many: int, few: int) -> dict:
    """Accuracies (fractions in 0-1) from predicted and true labels."""
    preds = np.asarray(preds)
    labels = np.asarray(labels)
    C = len(train_counts)
    total = np.bincount(labels, minlength=C).astype(np.float64)
    correct = np.bincount(labels[preds == labels], minlength=C).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(total > 0, correct / np.where(total > 0, total, 1), np.nan)
    groups = shot_groups(train_counts, many, few)

    def mean(mask) -> float:
        vals = per_class[mask & ~np.isnan(per_class)]
        return float(vals.mean()) if vals.size else math.nan

    return {
        "all": mean(np.ones(C, dtype=bool)),
        "many": mean(groups == "many"),
        "medium": mean(groups == "medium"),
        "few": mean(groups == "few"),
        "micro": float((preds == labels).mean()) if labels.size else math.nan,
        "per_class": [None if math.isnan(v) else float(v) for v in per_class],
    }


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (scipy.stats.rankdata's 'average')."""
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    ends = np.r_[starts[1:], s.size]
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties: average ranks), as ``scipy.stats.spearmanr(x, y)`` gives
    it; here in numpy because importing scipy.stats costs every fresh Ray worker half a second
    for this one number. NaN when either side is constant."""
    rx = _average_ranks(np.asarray(x, dtype=np.float64))
    ry = _average_ranks(np.asarray(y, dtype=np.float64))
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry / den) if den > 0 else math.nan


def balance_stats(norms: Sequence[float], counts: Sequence[int]) -> dict:
    """How balanced the per-class weight norms are.

    - ``norm_ratio``: max / min norm (1 = perfectly balanced);
    - ``norm_cv``: coefficient of variation, std / mean (population std);
    - ``norm_spearman``: Spearman rank correlation between class training count and norm (+1: the
      frequent classes have the larger weights, the naive-training pattern of WB Fig. 2).
    """
    n = np.asarray(norms, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    ratio = float(n.max() / n.min()) if n.size and n.min() > 0 else math.nan
    cv = float(n.std() / n.mean()) if n.size and n.mean() > 0 else math.nan
    # Equal norms (L2-normalised rows) differ only by float rounding; ranking that noise would give
    # a meaningless rho, so constant norms (CV < 1e-6) or constant counts report NaN.
    constant = not n.size or not n.mean() > 0 or n.std() / n.mean() < 1e-6
    if n.size > 2 and not constant and np.ptp(c) > 0:
        rho = spearman(c, n)
    else:
        rho = math.nan
    return {"norm_ratio": ratio, "norm_cv": cv, "norm_spearman": rho}


def _autocast(device, enabled: bool):
    import contextlib

    import torch

    if enabled and getattr(device, "type", str(device)) == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_features(backbone, split, augmenter, batch_size: int, flip: bool = False, amp: bool = False):
    """Backbone features of a DeviceSplit (no augmentation), in the backbone's current mode.
    With ``flip`` the features of the horizontally flipped images are returned as well."""
    import torch

    feats, feats_f = [], []
    device = split.y.device
    with torch.no_grad(), _autocast(device, amp):
        for x in _eval_inputs(split, augmenter, batch_size):
            feats.append(backbone(x).float())
            if flip:
                feats_f.append(backbone(x.flip(3)).float())
    out = torch.cat(feats) if feats else torch.zeros(0, device=device)
    if flip:
        return out, (torch.cat(feats_f) if feats_f else torch.zeros(0, device=device))
    return out


def _eval_inputs(split, augmenter, batch_size: int):
    """A split's normalised, unaugmented images in order, batch by batch: indexed from a
    DeviceSplit, or decoded by a file dataset's StreamSplit (its evaluation transform)."""
    if hasattr(split, "eval_batches"):
        for x, _ in split.eval_batches(batch_size):
            yield x
        return
    for i in range(0, len(split), batch_size):
        yield augmenter.normalize(split.x[i : i + batch_size])


def logits_from_features(head, feats, feats_flipped=None):
    """Apply a head to features; with flipped features, average the two views' logits (WB's TTA)."""
    import torch

    with torch.no_grad():
        logits = head(feats)
        if feats_flipped is not None:
            logits = 0.5 * (logits + head(feats_flipped))
    return logits


def evaluate_head(backbone, head, split, augmenter, data, batch_size: int, tta_flip: bool, amp: bool = False) -> dict:
    """Accuracy report of ``head(backbone(x))`` on a DeviceSplit."""
    flip = bool(tta_flip and data.spec.flip)
    f = compute_features(backbone, split, augmenter, batch_size, flip=flip, amp=amp)
    logits = logits_from_features(head, *(f if flip else (f,)))
    preds = logits.argmax(1).cpu().numpy()
    return accuracy_report(preds, split.y.cpu().numpy(), data.train_counts, data.many_threshold, data.few_threshold)


def summarize(report: dict) -> dict:
    """A report without its per-class list (for compact logs)."""
    return {k: v for k, v in report.items() if k != "per_class"}
