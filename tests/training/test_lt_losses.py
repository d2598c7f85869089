"""The long-tailed losses against transcriptions of their original code (value and gradient with
respect to the logits, on random inputs), the DRW weights, and their configuration errors.

Transcribed (the originals are not importable here; each function below restates their code):
kaidic/LDAM-DRW @ 2536330 ``losses.py`` (FocalLoss, focal_loss, LDAMLoss) and ``cifar_train.py``
(the DRW weights); jiawei-ren/BalancedMetaSoftmax-Classification @ 34a61e4
``loss/BalancedSoftmaxLoss.py``; google-research logit_adjustment @ 1d4d2f1 ``main.py``
``build_loss_fn`` (TensorFlow there, the same arithmetic in torch here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from study.config.schema import Stage1Config, Stage2Config
from study.errors import ConfigError
from study.training.losses import class_balanced_weights, make_loss

COUNTS = [500, 300, 120, 60, 25, 10, 5]
C = len(COUNTS)


# --- transcriptions of the original code --------------------------------------------------------------------


def ref_focal_loss(input_values, gamma):  # LDAM-DRW losses.py focal_loss
    p = torch.exp(-input_values)
    loss = (1 - p) ** gamma * input_values
    return loss.mean()


def ref_focal(input, target, weight=None, gamma=0.0):  # LDAM-DRW losses.py FocalLoss.forward
    return ref_focal_loss(F.cross_entropy(input, target, reduction="none", weight=weight), gamma)


def ref_ldam(x, target, cls_num_list, max_m=0.5, weight=None, s=30):  # LDAM-DRW losses.py LDAMLoss
    m_list = 1.0 / np.sqrt(np.sqrt(cls_num_list))
    m_list = m_list * (max_m / np.max(m_list))
    m_list = torch.FloatTensor(m_list)
    index = torch.zeros_like(x, dtype=torch.uint8)
    index.scatter_(1, target.data.view(-1, 1), 1)
    index_float = index.type(torch.FloatTensor)
    batch_m = torch.matmul(m_list[None, :], index_float.transpose(0, 1))
    batch_m = batch_m.view((-1, 1))
    x_m = x - batch_m
    output = torch.where(index.bool(), x_m, x)
    return F.cross_entropy(s * output, target, weight=weight)


def ref_drw_weights(cls_num_list, epoch, idx_epoch=160):  # LDAM-DRW cifar_train.py, train_rule == 'DRW'
    idx = epoch // idx_epoch
    betas = [0, 0.9999]
    effective_num = 1.0 - np.power(betas[idx], cls_num_list)
    per_cls_weights = (1.0 - betas[idx]) / np.array(effective_num)
    per_cls_weights = per_cls_weights / np.sum(per_cls_weights) * len(cls_num_list)
    return torch.FloatTensor(per_cls_weights)


def ref_balanced_softmax(labels, logits, sample_per_class, reduction="mean"):  # BalancedSoftmaxLoss.py
    spc = torch.tensor(sample_per_class).type_as(logits)
    spc = spc.unsqueeze(0).expand(logits.shape[0], -1)
    logits = logits + spc.log()
    return F.cross_entropy(input=logits, target=labels, reduction=reduction)


def ref_la_loss(logits, labels, base_probs, tau=1.0):  # logit_adjustment main.py build_loss_fn (TF -> torch)
    # TF: tf.math.log(tf.cast(base_probs**tau + 1e-12, dtype=tf.float32)): the cast comes before the log
    adjustment = torch.log(torch.tensor(np.power(base_probs, tau) + 1e-12).float())
    return F.cross_entropy(logits + adjustment, labels)


def ref_cb_focal(labels, logits, alpha, gamma):  # vandit15/Class-balanced-loss-pytorch focal_loss (= Cui TF)
    BCLoss = F.binary_cross_entropy_with_logits(input=logits, target=labels, reduction="none")
    if gamma == 0.0:
        modulator = 1.0
    else:
        modulator = torch.exp(-gamma * labels * logits - gamma * torch.log(1 + torch.exp(-1.0 * logits)))
    loss = modulator * BCLoss
    weighted_loss = alpha * loss
    focal_loss = torch.sum(weighted_loss)
    focal_loss /= torch.sum(labels)
    return focal_loss


def ref_cb_loss(labels, logits, samples_per_cls, no_of_classes, beta, gamma):  # vandit15 CB_loss, focal branch
    effective_num = 1.0 - np.power(beta, samples_per_cls)
    weights = (1.0 - beta) / np.array(effective_num)
    weights = weights / np.sum(weights) * no_of_classes
    labels_one_hot = F.one_hot(labels, no_of_classes).float()
    weights = torch.tensor(weights).float()
    weights = weights.unsqueeze(0)
    weights = weights.repeat(labels_one_hot.shape[0], 1) * labels_one_hot
    weights = weights.sum(1)
    weights = weights.unsqueeze(1)
    weights = weights.repeat(1, no_of_classes)
    return ref_cb_focal(labels_one_hot, logits, weights, gamma)


# --- helpers --------------------------------------------------------------------------------------------------


def _batch(seed: int, b: int = 64):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, C, generator=g)).requires_grad_(True)
    y = torch.randint(0, C, (b,), generator=g)
    return logits, y


def _value_and_grad(fn, logits, y):
    x = logits.detach().clone().requires_grad_(True)
    v = fn(x, y)
    (g,) = torch.autograd.grad(v, x)
    return v.detach(), g


def _ours(epoch: int = 0, **kw):
    cfg = Stage1Config(backbone="digits-cnn", epochs=200, **kw)
    return lambda z, y: make_loss(cfg, COUNTS, "cpu")(z, y, epoch)


def _assert_same(ours, ref, seeds=(0, 1, 2), atol=1e-6):
    for seed in seeds:
        logits, y = _batch(seed)
        v1, g1 = _value_and_grad(ours, logits, y)
        v2, g2 = _value_and_grad(ref, logits, y)
        assert torch.allclose(v1, v2, rtol=1e-6, atol=atol), (seed, v1, v2)
        assert torch.allclose(g1, g2, rtol=1e-5, atol=atol), seed


# --- the tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_focal_equals_ldam_drw_focal_loss(gamma):
    _assert_same(_ours(loss="focal", focal_gamma=gamma), lambda z, y: ref_focal(z, y, gamma=gamma))


@pytest.mark.parametrize("max_m, s", [(0.5, 30.0), (0.3, 10.0)])
def test_ldam_equals_ldam_drw_ldam_loss(max_m, s):
    _assert_same(
        _ours(loss="ldam", ldam_max_m=max_m, ldam_s=s), lambda z, y: ref_ldam(z, y, COUNTS, max_m=max_m, s=s), atol=1e-5
    )


def test_drw_weights_are_ldam_drw_weights_and_switch_at_the_epoch():
    assert torch.equal(class_balanced_weights(COUNTS, 0.9999), ref_drw_weights(COUNTS, 160))
    assert torch.equal(ref_drw_weights(COUNTS, 159), torch.ones(C))  # beta 0: all ones before the switch
    w = ref_drw_weights(COUNTS, 160)
    # LDAM-DRW: CE and LDAM take the weights as PyTorch's weight= (weighted mean), focal inside its CE
    _assert_same(_ours(160, loss="ce", drw_epoch=160), lambda z, y: F.cross_entropy(z, y, weight=w))
    _assert_same(_ours(159, loss="ce", drw_epoch=160), lambda z, y: F.cross_entropy(z, y))
    _assert_same(_ours(170, loss="ldam", drw_epoch=160), lambda z, y: ref_ldam(z, y, COUNTS, weight=w), atol=1e-5)
    _assert_same(_ours(199, loss="focal", drw_epoch=160), lambda z, y: ref_focal(z, y, weight=w, gamma=1.0))


def test_balanced_softmax_equals_its_original_code():
    _assert_same(_ours(loss="balanced-softmax"), lambda z, y: ref_balanced_softmax(y, z, COUNTS))


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_la_loss_equals_the_logit_adjustment_code(tau):
    prior = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    _assert_same(_ours(loss="la-loss", la_tau=tau), lambda z, y: ref_la_loss(z, y, prior, tau))


def test_balanced_softmax_and_the_la_loss_at_tau_1_are_the_same_loss():
    bs, la = _ours(loss="balanced-softmax"), _ours(loss="la-loss", la_tau=1.0)
    _assert_same(bs, la, atol=1e-5)


def test_plain_ce_is_unchanged_bit_for_bit():
    logits, y = _batch(7)
    ours = make_loss(Stage1Config(backbone="digits-cnn"), COUNTS, "cpu")(logits, y, 0)
    before = F.cross_entropy(logits.float(), y, reduction="none").mean()  # what `ce` always computed
    assert torch.equal(ours, before)


@pytest.mark.parametrize(
    "kw, key, words",
    [
        ({"loss": "cb", "drw_epoch": 10}, "drw_epoch", ["loss: cb"]),
        ({"drw_epoch": 20, "epochs": 20}, "drw_epoch", ["epochs (20)"]),
        ({"loss": "focal", "focal_gamma": -1.0}, "focal_gamma", ["-1"]),
        ({"loss": "ldam", "ldam_s": 0.0}, "ldam_s", ["0"]),
        ({"loss": "lmda"}, "loss", ["ldam", "balanced-softmax", "la-loss"]),
        ({"classifier": "normed", "maxnorm": True}, "maxnorm", ["classifier: normed"]),
        ({"classifier": "normed", "feature_reg": 0.01}, "feature_reg", ["classifier: normed"]),
        ({"classifier": "normed", "cosine_scale": 0.0}, "cosine_scale", ["0"]),
    ],
)
def test_bad_combinations_name_the_keys(kw, key, words):
    with pytest.raises(ConfigError) as e:
        Stage1Config(backbone="digits-cnn", **{"epochs": 30, **kw})
    assert e.value.key == key
    for w in words:
        assert w in str(e.value)


def test_stage2_takes_the_same_losses():
    cfg = Stage2Config(method="crt", loss="balanced-softmax", epochs=5)
    logits, y = _batch(3)
    v = make_loss(cfg, COUNTS, "cpu")(logits, y, 0)
    assert torch.allclose(v, ref_balanced_softmax(y, logits, COUNTS))


@pytest.mark.parametrize("form, gamma", [("focal", 1.0), ("focal", 2.0), ("sigmoid", 0.0)])
def test_cb_sigmoid_and_focal_forms_equal_cuis_code(form, gamma):
    """Cui et al.'s sigmoid (gamma 0: no modulator) and sigmoid-focal class-balanced losses, as the
    vandit15 port computes them (measured equal to their TensorFlow original)."""
    ours = _ours(loss="cb", cb_form=form, cb_beta=0.9999, focal_gamma=gamma)
    _assert_same(ours, lambda z, y: ref_cb_loss(y, z, COUNTS, C, 0.9999, gamma), atol=1e-5)


# --- LDAM's cosine classifier ------------------------------------------------------------------------------------


class RefNormedLinear(torch.nn.Module):  # LDAM-DRW models/resnet_cifar.py NormedLinear
    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.Tensor(in_features, out_features))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x):
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))


def _normed_model(**kw):
    from study.training.models import build_model

    cfg = Stage1Config(backbone="digits-cnn", epochs=200, classifier="normed", **kw)
    return cfg, build_model(cfg.backbone, C, 1, seed=0, cosine_scale=cfg.cosine_scale)


@pytest.mark.parametrize("drw", [False, True])
def test_ldam_with_the_normed_classifier_equals_ldam_drw(drw):
    """LDAM-DRW's head and loss on the same features and the same (transposed) weights: the loss,
    its gradient with respect to the classifier rows and to the backbone's raw features."""
    cfg, model = _normed_model(loss="ldam", drw_epoch=160 if drw else None)
    ref = RefNormedLinear(model.feat_dim, C)
    with torch.no_grad():
        ref.weight.copy_(3 * model.classifier.weight.t())  # the norm of a row must not matter
        model.classifier.weight.mul_(3)
    loss = make_loss(cfg, COUNTS, "cpu")
    w = ref_drw_weights(COUNTS, 170) if drw else None
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        raw = 4 * torch.randn(32, model.feat_dim, generator=g)
        y = torch.randint(0, C, (32,), generator=g)
        f1, f2 = raw.clone().requires_grad_(True), raw.clone().requires_grad_(True)
        ours = loss(model.classifier(F.normalize(f1, dim=1)), y, 170)  # the backbone's hook normalises
        theirs = ref_ldam(ref(f2), y, COUNTS, weight=w)
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
        gw1, gf1 = torch.autograd.grad(ours, [model.classifier.weight, f1])
        gw2, gf2 = torch.autograd.grad(theirs, [ref.weight, f2])
        assert torch.allclose(gw1, gw2.t(), rtol=1e-4, atol=1e-6)
        assert torch.allclose(gf1, gf2, rtol=1e-4, atol=1e-6)


def test_normed_model_gives_scaled_cosines_and_its_affine_form_agrees():
    from study.training.heads import AffineHead, frozen_model, stage1_head_state

    cfg, model = _normed_model(loss="ce", cosine_scale=16.0)
    model.eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        f = model.backbone(x)
        z = model(x)
    assert torch.allclose(f.norm(dim=1), torch.ones(5), atol=1e-5)  # unit features
    assert z.abs().max() <= 16.0 + 1e-4
    state = model.state_dict()
    assert float(state["classifier.cosine_scale"]) == 16.0
    head = AffineHead.from_state(stage1_head_state(state))  # what stage 2 and the final evaluation use
    assert torch.allclose(head(f), z, atol=1e-5)
    assert torch.allclose(head.weight.norm(dim=1), torch.full((C,), 16.0))

    class _Data:  # frozen_model needs num_classes and the image shape
        num_classes = C

        class spec:
            shape = (1, 28, 28)

    again = frozen_model("digits-cnn", state, _Data, "cpu")
    with torch.no_grad():
        assert torch.allclose(again(x), z, atol=1e-6)
