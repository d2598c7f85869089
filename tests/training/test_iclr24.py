"""Hasegawa & Sato (ICLR 2024) in stage 1: the fixed ETF classifier, the feature regulariser, weight
decay as a loss term, and the too-narrow-backbone error; plus what MaxNorm records about binding."""

from __future__ import annotations

import json
import math

import pytest
import torch

from study.config.schema import Stage1Config
from study.training.regularizers import MaxNorm, feature_penalty
from study.training.trainers import Stage1Trainer, train_stage1

BACKBONE = "digits-cnn"


def s1(**kw) -> Stage1Config:
    return Stage1Config(**{"backbone": BACKBONE, "epochs": 2, "batch_size": 64, "lr": 0.05, "weight_decay": 5e-3, **kw})


def test_the_etf_classifier_is_a_fixed_simplex_and_only_its_bias_trains(digits_data):
    t = Stage1Trainer(s1(classifier="etf", feature_reg=0.01), digits_data, seed=2)
    w0 = t.model.classifier.weight.detach().clone()
    b0 = t.model.classifier.bias.detach().clone()
    C = w0.shape[0]
    cos = w0 @ w0.T
    assert torch.allclose(w0.norm(dim=1), torch.ones(C), atol=1e-6)
    off = cos[~torch.eye(C, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / (C - 1)), atol=1e-6)
    assert not any(p is t.model.classifier.weight for g in t.opt.param_groups for p in g["params"])
    while not t.done:
        t.run_epoch()
    assert torch.equal(t.model.classifier.weight, w0)  # bit-identical after training
    assert not torch.equal(t.model.classifier.bias, b0)  # the bias trained
    res = t.result()
    assert torch.equal(res["state"]["classifier.weight"], w0)  # the selected weights too
    assert max(res["weight_norms"]) == pytest.approx(1.0, abs=1e-6) and min(res["weight_norms"]) == pytest.approx(
        1.0, abs=1e-6
    )
    # seeded by the trial seed: another seed, another frame
    other = Stage1Trainer(s1(classifier="etf"), digits_data, seed=3).model.classifier.weight
    assert not torch.allclose(other, w0)


def test_the_feature_regulariser_gradient_is_zeta_f_over_b():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(8, 5, generator=g, requires_grad=True)
    feature_penalty(f, 0.01).backward()
    torch.testing.assert_close(f.grad, 0.01 * f.detach() / 8, rtol=1e-6, atol=1e-9)


def test_the_feature_regulariser_changes_training(digits_data):
    a = train_stage1(s1(epochs=1), digits_data, seed=0, device="cpu")
    b = train_stage1(s1(epochs=1, feature_reg=0.5), digits_data, seed=0, device="cpu")
    assert not torch.equal(a["state"]["classifier.weight"], b["state"]["classifier.weight"])


def test_weight_decay_as_a_loss_term_equals_the_optimizers_with_momentum(digits_data):
    """Plain SGD with momentum: a loss term lambda * sum||theta||^2 / 2 gives the same update as
    coupled weight decay; after k steps (an epoch of 6 batches, x 2) the weights agree to 1e-6."""
    cfg = dict(epochs=2, weight_decay=0.05, momentum=0.9)
    opt = Stage1Trainer(s1(**cfg), digits_data, seed=4)
    loss = Stage1Trainer(s1(**cfg, wd_form="loss"), digits_data, seed=4)
    start = {k: v.clone() for k, v in opt.model.state_dict().items()}
    assert loss.opt.param_groups[0]["weight_decay"] == 0.0 and opt.opt.param_groups[0]["weight_decay"] == 0.05
    for t in (opt, loss):
        while not t.done:
            t.run_epoch()
    assert opt.step == loss.step >= 10
    a, b = opt.model.state_dict(), loss.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=1e-6)
    assert (a["classifier.weight"] - start["classifier.weight"]).abs().max() > 1e-3  # the weights did train
    # and decay matters: without it the weights differ by far more than the tolerance
    none = Stage1Trainer(s1(epochs=2, weight_decay=0.0, momentum=0.9), digits_data, seed=4)
    while not none.done:
        none.run_epoch()
    assert (none.model.state_dict()["classifier.weight"] - a["classifier.weight"]).abs().max() > 1e-4


def test_maxnorm_counts_when_it_binds():
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    m = MaxNorm(w, 0.0, "relative", "step")  # radius = the smallest row norm, 1
    assert m.radius == 1.0 and m.stats()["maxnorm_binding"] is None
    m.after_step(w)  # clips rows 0 and 2
    m.after_step(w)  # nothing left to clip
    m.after_epoch(w)  # per-step mode: no projection at the epoch end
    st = m.stats()
    assert st == {"maxnorm_calls": 2, "maxnorm_binding": 0.5, "maxnorm_rows_clipped": 1.0}
    again = MaxNorm(w, 0.0)
    again.load_state_dict(m.state_dict())
    assert again.stats() == st


def test_a_too_narrow_backbone_for_etf_is_one_line_before_anything_is_written(tmp_path, capsys, cifar100_lt_files):
    from study.cli import main

    out = tmp_path / "out"
    code = main(
        [
            "train",
            "cifar100-lt",
            "--data-dir",
            str(cifar100_lt_files.root),
            "--out",
            str(out),
            "--set",
            "stage1.classifier=etf",
            "--set",
            "stage1.feature_reg=0.01",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "etf needs a feature dimension of at least 99" in err and "resnet32 gives 64" in err and "resnet34-wb" in err
    assert not out.exists()


@pytest.mark.slow  # about 75 s on 2 cores: both stages of a ResNet-34-stem model on CIFAR-sized images
def test_etf_with_a_wide_enough_backbone_runs_both_stages(tmp_path, cifar100_lt_files):
    """`study train` on generated CIFAR-100 files with resnet34-wb (512-d features), a tiny subset."""
    from study.cli import main

    out = tmp_path / "out"
    sets = [
        "stage1.classifier=etf",
        "stage1.feature_reg=0.01",
        "stage1.backbone=resnet34-wb",
        "stage1.epochs=1",
        "stage1.batch_size=128",
        "stage2.epochs=1",
        "data.n_max=6",
        "data.imbalance_factor=3",
        "data.val_per_class=1",
        "eval.batch_size=256",
    ]
    code = main(
        [
            "train",
            "cifar100-lt",
            "--data-dir",
            str(cifar100_lt_files.root),
            "--out",
            str(out),
            "--seeds",
            "1",
            "--method",
            "la-mul",
            *sum((["--set", s] for s in sets), []),
        ]
    )
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["stage1"]["classifier"] == "etf" and m["config"]["stage1"]["backbone"] == "resnet34-wb"
    run = m["runs"][0]
    assert all(math.isclose(n, 1.0, abs_tol=1e-5) for n in run["stage1"]["weight_norms"])  # the ETF rows
    assert run["stage2"]["tau"] is not None and 0 <= run["stage2"]["test"]["all"] <= 1
    assert run["stage1"]["geometry"]["train"]["fdr"] > 0
