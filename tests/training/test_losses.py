"""Class-balanced weights and the two CB loss forms (docs/reference.md §5.1)."""

from __future__ import annotations

import math
import types

import pytest
import torch

from study.config.datasets import lt_counts
from study.errors import UserError
from study.training.losses import cb_bce_softmax, class_balanced_weights, make_loss, weighted_cross_entropy


def test_cb_weights_cifar100_if100_match_reference():
    counts = lt_counts(500, 100, 100)
    w = class_balanced_weights(counts, 0.9999)
    assert w.shape == (100,) and w.dtype == torch.float32
    assert float(w.sum()) == pytest.approx(100.0, rel=1e-6)
    assert float(w[0]) == pytest.approx(0.0449, abs=5e-5)  # n = 500
    assert float(w[-1]) == pytest.approx(4.378, abs=5e-4)  # n = 5
    assert float(w[-1] / w[0]) == pytest.approx(97.6, abs=0.05)
    # monotone: fewer images, larger weight
    assert torch.all(w[1:] >= w[:-1])


def test_cb_weights_by_hand():
    counts, beta = [10, 3, 1], 0.9
    eff = [(1 - beta**n) / (1 - beta) for n in counts]
    inv = [1 / e for e in eff]
    expected = [3 * v / sum(inv) for v in inv]
    torch.testing.assert_close(class_balanced_weights(counts, beta), torch.tensor(expected), rtol=1e-6, atol=0)


def test_cb_weights_beta_one_is_inverse_frequency():
    counts = [500, 100, 20, 5]
    w = class_balanced_weights(counts, 1.0)
    inv = torch.tensor([1 / n for n in counts], dtype=torch.float64)
    torch.testing.assert_close(w, (inv / inv.sum() * 4).float())
    assert float(w[3] / w[0]) == pytest.approx(100.0, rel=1e-5)
    # beta -> 1 approaches the same limit; beta = 0 gives equal weights (E_c = 1)
    torch.testing.assert_close(class_balanced_weights(counts, 1 - 1e-9), w, rtol=1e-3, atol=0)
    torch.testing.assert_close(class_balanced_weights(counts, 0.0), torch.ones(4))


def test_weighted_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2, 1, 1])
    w = torch.tensor([0.5, 1.5, 3.0])

    def ce(row, t):
        return -(row[t] - math.log(sum(math.exp(v) for v in row)))

    rows = logits.tolist()
    per = [ce(r, t) for r, t in zip(rows, y.tolist())]
    assert float(weighted_cross_entropy(logits, y)) == pytest.approx(sum(per) / 4, rel=1e-6)
    weighted = [w[t].item() * p for t, p in zip(y.tolist(), per)]
    # a mean over the batch, not PyTorch's weight-normalised mean
    assert float(weighted_cross_entropy(logits, y, w)) == pytest.approx(sum(weighted) / 4, rel=1e-6)
    torch_style = torch.nn.functional.cross_entropy(logits, y, weight=w)
    assert float(torch_style) != pytest.approx(sum(weighted) / 4, rel=1e-3)


def test_cb_bce_softmax_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0]])
    y = torch.tensor([0, 2, 1])
    w = torch.tensor([0.5, 1.5, 3.0])
    B, C = logits.shape
    total = 0.0
    for i, row in enumerate(logits.tolist()):
        z = sum(math.exp(v) for v in row)
        p = [math.exp(v) / z for v in row]
        for j in range(C):
            t = 1.0 if j == y[i] else 0.0
            total += -w[y[i]].item() * (t * math.log(p[j]) + (1 - t) * math.log(1 - p[j]))
    expected = total / (B * C)  # mean over all B x C entries
    assert float(cb_bce_softmax(logits, y, w)) == pytest.approx(expected, rel=1e-6)
    # it is not the weighted softmax cross-entropy
    assert float(cb_bce_softmax(logits, y, w)) != pytest.approx(float(weighted_cross_entropy(logits, y, w)), rel=1e-2)


def test_cb_bce_gradient_flows():
    logits = torch.randn(5, 4, requires_grad=True)
    loss = cb_bce_softmax(logits, torch.tensor([0, 1, 2, 3, 0]), torch.ones(4))
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_make_loss_dispatch():
    from study.config.schema import Stage1Config

    counts = [50, 10, 2]
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    w = class_balanced_weights(counts, 0.99)

    def cfg(**kw):
        return Stage1Config(backbone="digits-cnn", cb_beta=0.99, **kw)

    assert torch.equal(make_loss(cfg(loss="ce"), counts, "cpu")(logits, y), weighted_cross_entropy(logits, y))
    assert torch.equal(make_loss(cfg(loss="cb"), counts, "cpu")(logits, y), weighted_cross_entropy(logits, y, w))
    assert torch.equal(make_loss(cfg(loss="cb", cb_form="bce"), counts, "cpu")(logits, y), cb_bce_softmax(logits, y, w))
    with pytest.raises(UserError, match="unknown loss 'nope'.*balanced-softmax"):
        make_loss(types.SimpleNamespace(loss="nope", drw_epoch=None, cb_beta=0.9), counts, "cpu")
