"""Post-hoc logit adjustment in stage 2 (``la-add``: z_c - tau log pi_c, Menon et al.; ``la-mul``:
z_c * pi_c^(-tau), Hasegawa & Sato), through the public ``train_stage2`` on the bundled digits-lt
data with a tiny CNN (CPU). Only the result dict is read: ``tau``, ``tau_curve``, ``selection`` and
the affine head ``state["head"]`` (logits = W f + b); the expected values are computed here by hand
from the stage-1 classifier and the training priors pi_c = n_c / N."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from study.config.schema import EvalConfig, Stage1Config, Stage2Config
from study.data.device import Augmenter, DeviceSplit
from study.training.evaluation import compute_features
from study.training.models import build_model
from study.training.trainers import train_stage1, train_stage2

BACKBONE = "digits-cnn"
METHODS = ["la-add", "la-mul"]
DEFAULT_GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0]


@pytest.fixture(scope="module")
def stage1_state(digits_data):
    """A naive stage-1 model (3 epochs of CE, seed 0): its classifier favours the head classes."""
    cfg = Stage1Config(backbone=BACKBONE, epochs=3, batch_size=64, lr=0.05, weight_decay=5e-4)
    return train_stage1(cfg, digits_data, seed=0, device="cpu")["state"]


@pytest.fixture(scope="module")
def features(digits_data, stage1_state):
    """Backbone features of the selection and test splits, with the stage-1 model (eval mode)."""
    model = build_model(BACKBONE, digits_data.num_classes, digits_data.spec.shape[0])
    model.load_state_dict(stage1_state)
    model.eval()
    aug = Augmenter(digits_data.spec, "cpu", False)
    batch = EvalConfig().batch_for("cpu")
    out = {}
    for split in ("selection", "test"):
        x, y = digits_data.split(split)
        out[split] = (compute_features(model.backbone, DeviceSplit(x, y, "cpu"), aug, batch), np.asarray(y))
    return model, out


@pytest.fixture(scope="module")
def priors(digits_data):
    """pi_c = n_c / N, counted here from the training labels (and the library's ``priors()`` agrees)."""
    n = np.bincount(np.asarray(digits_data.train_y), minlength=digits_data.num_classes).astype(np.float64)
    assert list(n.astype(int)) == list(digits_data.train_counts)
    pi = n / n.sum()
    np.testing.assert_allclose(digits_data.priors(), pi, rtol=0, atol=1e-15)
    return pi


def run(method: str, data, stage1_state, **kw) -> dict:
    return train_stage2(Stage2Config(method=method, **kw), data, 0, stage1_state, BACKBONE, device="cpu")


def head_logits(result: dict, feats: torch.Tensor) -> torch.Tensor:
    """The result's affine head applied to features (float64): W f + b."""
    head = result["state"]["head"]
    assert head["center"] is None and not head["l2"]  # logit adjustment is a plain affine map
    return feats.double() @ head["weight"].double().T + head["bias"].double()


def stage1_logits(stage1_state: dict, feats: torch.Tensor) -> torch.Tensor:
    W, b = stage1_state["classifier.weight"].double(), stage1_state["classifier.bias"].double()
    return feats.double() @ W.T + b


def adjusted_by_hand(method: str, z: torch.Tensor, pi: np.ndarray, tau: float) -> torch.Tensor:
    """The two forms of logit adjustment, from the stage-1 logits z."""
    pi = torch.as_tensor(pi, dtype=torch.float64)
    if method == "la-add":
        return z - tau * torch.log(pi)
    return z * pi.pow(-tau)


def balanced_accuracy(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """The mean of the per-class accuracies (the 'All' of every report)."""
    return float(np.mean([np.mean(correct[labels == c]) for c in range(num_classes)]))


def accuracy_bounds(logits: torch.Tensor, labels: np.ndarray, num_classes: int, rel: float = 1e-5):
    """Balanced accuracy of argmax(logits), as (low, high): a sample whose two best logits lie within
    ``rel`` of its largest |logit| could go either way in the library's float32, so it counts as wrong
    for the low and as right for the high bound (without such samples, low == high: exact)."""
    top = logits.topk(2, dim=1)
    correct = (top.indices[:, 0] == torch.as_tensor(labels)).numpy()
    close = ((top.values[:, 0] - top.values[:, 1]) <= rel * logits.abs().max(1).values).numpy()
    return (
        balanced_accuracy(correct & ~close, labels, num_classes),
        balanced_accuracy(correct | close, labels, num_classes),
    )


# --- tau = 0 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_tau_zero_gives_the_stage1_predictions(digits_data, stage1_state, features, method):
    model, feats = features
    res = run(method, digits_data, stage1_state, tau=0.0)
    assert res["tau"] == 0.0
    assert [t for t, _ in res["tau_curve"]] == [0.0]
    head = res["state"]["head"]
    assert head["center"] is None and not head["l2"]
    for split, (f, _) in feats.items():
        with torch.no_grad():
            reference = model.classifier(f).argmax(1)
            got = torch.nn.functional.linear(f, head["weight"], head["bias"]).argmax(1)  # W f + b, as stage 1
        assert torch.equal(got, reference), split
    # not only the argmax: tau = 0 leaves the stage-1 classifier exactly as it was
    assert torch.equal(head["weight"], stage1_state["classifier.weight"])
    assert torch.equal(head["bias"], stage1_state["classifier.bias"])


# --- tau chosen on the selection split -----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_tau_is_chosen_on_the_selection_split_and_recorded(digits_data, stage1_state, features, priors, method):
    assert Stage2Config(method=method).tau_grid() == pytest.approx(DEFAULT_GRID, abs=1e-12)
    res = run(method, digits_data, stage1_state)
    curve = res["tau_curve"]
    assert [t for t, _ in curve] == pytest.approx(DEFAULT_GRID, abs=1e-12)  # every grid value, in order
    # each recorded accuracy is the adjusted head's balanced accuracy on the selection split, by hand
    _, feats = features
    f, y = feats["selection"]
    z = stage1_logits(stage1_state, f)
    accs = [a for _, a in curve]
    exact = 0
    for t, acc in zip(DEFAULT_GRID, accs):
        lo, hi = accuracy_bounds(adjusted_by_hand(method, z, priors, t), y, digits_data.num_classes)
        assert lo - 1e-12 <= acc <= hi + 1e-12, (t, acc, lo, hi)
        exact += lo == hi
    assert exact >= 15  # near-ties are rare: most values are checked exactly
    best = max(accs)
    assert best > accs[0]  # on this data adjusting helps, so the choice below is a real one
    assert res["tau"] in DEFAULT_GRID
    assert res["tau"] == min(t for t, a in curve if a == best)  # the smallest argmax of the curve
    assert res["selection"]["all"] == best
    # the head returned is the one of the chosen tau
    torch.testing.assert_close(
        head_logits(res, f), adjusted_by_hand(method, z, priors, res["tau"]), rtol=1e-5, atol=1e-4
    )


def test_a_coarser_grid_records_only_its_values(digits_data, stage1_state):
    res = run("la-add", digits_data, stage1_state, tau_max=1.0, tau_step=0.25)
    assert [t for t, _ in res["tau_curve"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert res["tau"] in (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.mark.parametrize("method", METHODS)
def test_ties_keep_the_smallest_tau(digits_data, stage1_state, features, priors, method):
    """A grid of tiny taus changes no prediction, so every tau ties: the smallest (0) is kept."""
    grid = [0.0, 1e-9, 2e-9]
    _, feats = features
    f, _ = feats["selection"]
    z = stage1_logits(stage1_state, f)
    preds = [adjusted_by_hand(method, z, priors, t).argmax(1) for t in grid]
    assert all(torch.equal(p, preds[0]) for p in preds)  # a real tie, checked by hand
    res = run(method, digits_data, stage1_state, tau_max=2e-9, tau_step=1e-9)
    accs = [a for _, a in res["tau_curve"]]
    assert [t for t, _ in res["tau_curve"]] == pytest.approx(grid, abs=1e-15) and len(set(accs)) == 1
    assert res["tau"] == 0.0


# --- the two forms, by hand ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_adjusted_logits_match_the_hand_computation(digits_data, stage1_state, features, priors, method):
    tau = 0.7
    res = run(method, digits_data, stage1_state, tau=tau)
    assert res["tau"] == tau and [t for t, _ in res["tau_curve"]] == [tau]
    _, feats = features
    for split, (f, _) in feats.items():
        got = head_logits(res, f)
        expected = adjusted_by_hand(method, stage1_logits(stage1_state, f), priors, tau)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4, msg=split)
        # and the adjustment did change the logits (by up to tau * log(pi_max / pi_min) or a factor)
        assert not torch.allclose(got, stage1_logits(stage1_state, f), rtol=1e-3, atol=1e-3)
    # the head parameters themselves: W' = W, b' = b - tau log pi (add.); W' = s W, b' = s b, s = pi^-tau (mult.)
    W, b = stage1_state["classifier.weight"].double(), stage1_state["classifier.bias"].double()
    log_pi = torch.log(torch.as_tensor(priors, dtype=torch.float64))
    head = res["state"]["head"]
    if method == "la-add":
        exp_w, exp_b = W, b - tau * log_pi
    else:
        s = torch.exp(-tau * log_pi)
        exp_w, exp_b = W * s[:, None], b * s
    torch.testing.assert_close(head["weight"].double(), exp_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head["bias"].double(), exp_b, rtol=1e-6, atol=1e-6)


# --- larger tau, more tail predictions --------------------------------------------------------------------------

TAUS = [0.0, 0.5, 1.0, 1.5, 2.0]


@pytest.mark.parametrize("method", METHODS)
def test_larger_tau_moves_predictions_toward_tail_classes(digits_data, stage1_state, features, priors, method):
    """Over tau = 0, 0.5, ..., 2 the mean training prior of the predicted classes strictly falls and the
    number of predictions in the Few group never falls and ends higher, on the test and the selection split."""
    _, feats = features
    few = digits_data.groups() == "few"
    assert few.sum() == 4
    heads = [run(method, digits_data, stage1_state, tau=t) for t in TAUS]
    for split, (f, _) in feats.items():
        preds = [head_logits(res, f).argmax(1).numpy() for res in heads]
        mean_prior = [float(priors[p].mean()) for p in preds]
        n_few = [int(few[p].sum()) for p in preds]
        assert all(a > b for a, b in zip(mean_prior, mean_prior[1:])), (split, mean_prior)
        assert all(a <= b for a, b in zip(n_few, n_few[1:])), (split, n_few)
        assert n_few[-1] > n_few[0], (split, n_few)
        # The statement can fail: adjusting the other way (towards the head classes, by hand) raises it.
        z = stage1_logits(stage1_state, f)
        toward_head = adjusted_by_hand(method, z, priors, -1.0).argmax(1).numpy()
        assert priors[toward_head].mean() > mean_prior[0], split
